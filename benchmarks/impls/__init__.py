"""Hand-written reference implementations for the A/B benchmarks (see benchmarks/compare.py)."""


def build_for(info, cell, check=None):
    """The backend's own build of the cell's model with its seeded weights: (backend, ir).

    Args:
        info: The backend's BackendInfo.
        cell: The samenet.cell.Cell measured.
        check: Called with the resolved BuildConfig before the build (to refuse what an impl
            does not run).
    """
    from samenet import zoo
    from samenet.backend import BuildConfig, Optimizer
    from samenet.cell import weights_for

    b = info.create()
    b.configure(cell.threads, cell.cpu_settings == "tuned")
    ir = zoo.load(cell.model, cell.input)
    config = info.resolve_config(BuildConfig(cell.device, cell.precision, cell.exec_mode, dict(cell.options),
                                             Optimizer(cell.lr, cell.momentum, cell.weight_decay)))
    if check is not None:
        check(config)
    b.build(ir, config)
    b.set_weights(weights_for(ir, cell.seed))
    return b, ir
