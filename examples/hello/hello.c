/* The example image's program: prints the greeting that its dependency, the
 * greeting-lib store path, holds. Freestanding (no libc, raw system calls) so
 * that any C compiler makes a static binary that runs in an image with
 * nothing else in it: no /bin/sh, no dynamic loader, no libc.a needed. */

#define GREETING "/nix/store/7rjbq4yr2yb8h6dkhcyw0h6ps3a9vxmq-greeting-lib-1.0/share/greeting"

#if defined(__x86_64__)
#define SYS_read 0
#define SYS_write 1
#define SYS_exit 60
#define SYS_openat 257
static long sys3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}
static long sys4(long n, long a, long b, long c, long d)
{
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
#define SYS_read 63
#define SYS_write 64
#define SYS_exit 93
#define SYS_openat 56
static long sys4(long n, long a, long b, long c, long d)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
    return x0;
}
static long sys3(long n, long a, long b, long c) { return sys4(n, a, b, c, 0); }
#else
#error "examples/hello/hello.c knows the system calls of x86_64 and aarch64 only"
#endif

#define AT_FDCWD -100

static const char missing[] = "hello: cannot read " GREETING "\n";

void _start(void)
{
    char buf[4096];
    long fd = sys4(SYS_openat, AT_FDCWD, (long)GREETING, 0 /* O_RDONLY */, 0);
    long n, status = 0;
    if (fd < 0) {
        sys3(SYS_write, 2, (long)missing, sizeof missing - 1);
        status = 1;
    } else {
        while ((n = sys3(SYS_read, fd, (long)buf, sizeof buf)) > 0)
            if (sys3(SYS_write, 1, (long)buf, n) != n) {
                status = 1;
                break;
            }
    }
    sys3(SYS_exit, status, 0, 0);
    for (;;) {
    }
}
