// Untargeted syscall cost: best-of-5 ns per call of write(/dev/null, 1 byte) or getppid().
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int c, char **v) {
  int getppid_mode = c > 1 && !strcmp(v[1], "getppid");
  long n = c > 2 ? atol(v[2]) : 500000;
  int fd = open("/dev/null", O_WRONLY);
  char b = 0;
  double best = 1e12;
  for (int r = 0; r < 5; r++) {
    struct timespec a, z;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
      if (getppid_mode) getppid(); else if (write(fd, &b, 1) != 1) return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &z);
    double ns = ((z.tv_sec - a.tv_sec) * 1e9 + (z.tv_nsec - a.tv_nsec)) / n;
    if (ns < best) best = ns;
  }
  printf("%.0f\n", best);
  return 0;
}
