"""MindSpore's logging and dump locations, set before it is imported (user values win).

Every module of this package that imports MindSpore imports this one first: glog errors
only (MindSpore's default level 2 prints warnings), analyze_fail.ir dumps in a temp
directory rather than the working directory.
"""

import os
import tempfile

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), "samenet-mindspore-om"))
