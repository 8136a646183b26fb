// Traced-write cost: listens on 127.0.0.1:PORT; a forked child connects and drains; the parent
// (the agent's target) writes N 120-byte SSE-like chunks, prints best-of-3 ns per write().
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <signal.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
int main(int c, char **v) {
  long n = c > 1 ? atol(v[1]) : 200000; int port = c > 2 ? atoi(v[2]) : 18900;
  int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(0x7f000001)};
  if (bind(ls, (void *)&a, sizeof a) || listen(ls, 8)) { perror("bind"); return 1; }
  if (getenv("TW_GO")) { printf("%d\n", getpid()); fflush(stdout); while (access(getenv("TW_GO"), F_OK)) usleep(20000); }
  pid_t k = fork();
  if (!k) { int s = socket(AF_INET, SOCK_STREAM, 0); connect(s, (void *)&a, sizeof a); char b[1 << 16]; while (read(s, b, sizeof b) > 0); _exit(0); }
  int s = accept(ls, 0, 0);
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  char msg[120]; memset(msg, 'x', sizeof msg); memcpy(msg, "data: {\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n", 50);
  double best = 1e9;
  for (int r = 0; r < 3; r++) {
    struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) if (write(s, msg, sizeof msg) != sizeof msg) { perror("write"); return 1; }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n; if (ns < best) best = ns;
  }
  close(s); kill(k, SIGTERM);
  printf("write_ns %.0f\n", best);
}
