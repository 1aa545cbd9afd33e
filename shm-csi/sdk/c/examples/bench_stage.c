/* The C stage of `bench` (examples/bench.rs): the chain's last function,
 * which reads every byte of the payload (zlib's crc32, the one Python's
 * zlib.crc32 runs) and writes the checksum over the payload's first 4 bytes.
 * Usage: bench_stage <pool file>; prints its port, then serves. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <zlib.h>

#include "spright_shm.h"

static int checksum(void *ctx, spright_buf *buf) {
  (void)ctx;
  uint8_t *p = spright_buf_data(buf);
  size_t n = spright_buf_len(buf);
  uint32_t c = (uint32_t)crc32(0L, p, (uInt)n);
  for (int i = 0; i < 4 && (size_t)i < n; i++) p[i] = (uint8_t)(c >> (8 * i));
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s <pool file>\n", argv[0]);
    return 2;
  }
  spright_pool *pool;
  int rc = spright_pool_open(argv[1], 0, &pool);
  if (rc < 0) {
    fprintf(stderr, "%s\n", spright_strerror(rc));
    return 1;
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof sa;
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 16) ||
      getsockname(fd, (struct sockaddr *)&sa, &len)) {
    perror("listen");
    return 1;
  }
  printf("%u\n", ntohs(sa.sin_port));
  fflush(stdout);
  rc = spright_stage_run(pool, fd, NULL, checksum, NULL);
  fprintf(stderr, "stage stopped: %s\n", spright_strerror(rc));
  return 1;
}
