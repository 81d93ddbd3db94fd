/* LD_PRELOAD shim for data-parallel ranks: bind() to INADDR_ANY / in6addr_any becomes loopback.
   Paddle 3.3's TCPStore server listens on IP_ANY (hard-coded); samenet binds 127.0.0.1 only. */
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
        if (!memcmp(&s.sin6_addr, &in6addr_any, sizeof s.sin6_addr)) { s.sin6_addr = in6addr_loopback; return real(fd, (struct sockaddr *)&s, sizeof s); }
    }
    return real(fd, a, n);
}
