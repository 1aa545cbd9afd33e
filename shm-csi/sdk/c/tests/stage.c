/* A C stage of the cross-language chain test (tests/cross.rs): inverts
 * every byte of the payload in place and forwards it.
 * Usage: stage <pool file> <next host:port>; prints its port, then serves. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "spright_shm.h"

static int invert(void *ctx, spright_buf *buf) {
  (void)ctx;
  uint8_t *p = spright_buf_data(buf);
  size_t n = spright_buf_len(buf);
  for (size_t i = 0; i < n; i++) p[i] = (uint8_t)~p[i];
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s <pool file> <next host:port>\n", argv[0]);
    return 2;
  }
  spright_pool *pool;
  int rc = spright_pool_open(argv[1], 0, &pool);
  if (rc < 0) {
    char why[256];
    spright_last_error(why, sizeof why);
    fprintf(stderr, "%s: %s\n", spright_strerror(rc), why);
    return 1;
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof sa;
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 64) ||
      getsockname(fd, (struct sockaddr *)&sa, &len)) {
    perror("listen");
    return 1;
  }
  printf("%u\n", ntohs(sa.sin_port));
  fflush(stdout);
  rc = spright_stage_run(pool, fd, argv[2], invert, NULL);
  fprintf(stderr, "stage stopped: %s\n", spright_strerror(rc));
  spright_pool_close(pool);
  return 1;
}
