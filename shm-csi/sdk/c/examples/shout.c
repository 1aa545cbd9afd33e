/* A complete C function of a spright chain: receives each payload,
 * upper-cases it in place (in shared memory) and forwards it to $NEXT
 * (host:port), or answers it when $NEXT is unset (the last function).
 * Build: cc shout.c $(pkg-config --cflags --libs spright_shm) -o shout */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#include <spright_shm.h>

static int shout(void *ctx, spright_buf *buf) {
  (void)ctx;
  uint8_t *p = spright_buf_data(buf);
  for (size_t i = 0, n = spright_buf_len(buf); i < n; i++)
    if (p[i] >= 'a' && p[i] <= 'z') p[i] -= 'a' - 'A';
  return 0; /* forward buf; a negative code stops the loop */
}

int main(void) {
  spright_pool *pool;
  int rc = spright_pool_open("/var/run/spright-shm", 0, &pool);
  if (rc < 0) {
    char why[512];
    spright_last_error(why, sizeof why);
    fprintf(stderr, "%s\n%s\n", spright_strerror(rc), why);
    return 1;
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(8080)};
  if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) ||
      listen(fd, 128)) {
    perror("listen on :8080");
    return 1;
  }
  rc = spright_stage_run(pool, fd, getenv("NEXT"), shout, NULL);
  fprintf(stderr, "stage stopped: %s\n", spright_strerror(rc));
  spright_pool_close(pool);
  return 1;
}
