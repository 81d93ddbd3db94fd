/* LD_PRELOAD shim for every process of a data-parallel group (harness/distributed.py): a bind()
   to INADDR_ANY becomes 127.0.0.1, one to in6addr_any the v4-mapped ::ffff:127.0.0.1 (a
   dual-stack socket then still accepts the IPv4 loopback peers every rank dials). Paddle 3.3's
   TCPStore listens on IP_ANY (hard-coded), torch's rank 0 on [::]; samenet binds loopback only. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
int bind(int fd, const struct sockaddr *a, socklen_t n) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "bind");
    if (a && a->sa_family == AF_INET && n >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in s; memcpy(&s, a, sizeof s);
        if (s.sin_addr.s_addr == htonl(INADDR_ANY)) { s.sin_addr.s_addr = htonl(INADDR_LOOPBACK); return real(fd, (struct sockaddr *)&s, sizeof s); }
    }
    if (a && a->sa_family == AF_INET6 && n >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 s; memcpy(&s, a, sizeof s);
        if (!memcmp(&s.sin6_addr, &in6addr_any, sizeof s.sin6_addr)) {
            memset(&s.sin6_addr, 0, sizeof s.sin6_addr);
            s.sin6_addr.s6_addr[10] = 0xff; s.sin6_addr.s6_addr[11] = 0xff;
            s.sin6_addr.s6_addr[12] = 127; s.sin6_addr.s6_addr[15] = 1;
            return real(fd, (struct sockaddr *)&s, sizeof s);
        }
    }
    return real(fd, a, n);
}
