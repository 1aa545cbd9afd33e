/* Exercises every call of spright_shm.h, and every error it can return.
 * Built with -Wall -Wextra -Werror -fsanitize=address,undefined and run by
 * tests/c.rs. Usage: abi <scratch directory>. Exits 0 when all checks pass. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "spright_shm.h"

static int failures;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                              \
    }                                                                          \
  } while (0)

#define CHECK_RC(call, want)                                                   \
  do {                                                                         \
    int rc_ = (call);                                                          \
    if (rc_ != (want)) {                                                       \
      fprintf(stderr, "%s:%d: %s = %d (%s), want %d (%s)\n", __FILE__,         \
              __LINE__, #call, rc_, spright_strerror(rc_), (want),             \
              spright_strerror(want));                                         \
      failures++;                                                              \
    }                                                                          \
  } while (0)

static char last[512];

static const char *last_error(void) {
  spright_last_error(last, sizeof last);
  return last;
}

static void all_free(const spright_pool *pool) {
  spright_stats s;
  CHECK_RC(spright_pool_stats(pool, &s), 0);
  CHECK(memcmp(s.free, s.carved, sizeof s.free) == 0);
}

static void errors_are_named(void) {
  const int codes[] = {EINVAL, EBADMSG, EPROTO,  ENOSPC,   EMSGSIZE,
                       ENOMEM, ERANGE,  EFAULT,  EOVERFLOW, ESTALE,
                       EALREADY, ECONNRESET, EPIPE, EBADF};
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    const char *s = spright_strerror(-codes[i]);
    CHECK(s != NULL && strncmp(s, "unknown", 7) != 0);
  }
  CHECK(strncmp(spright_strerror(-ESTALE), "ESTALE", 6) == 0);
  CHECK(strcmp(spright_strerror(0), "0: success") == 0);
  CHECK(strcmp(spright_strerror(-99999), "unknown error code") == 0);
}

static void open_errors(const char *dir) {
  char path[4096];
  spright_pool *pool = NULL;
  CHECK_RC(spright_pool_open(NULL, 0, &pool), -EINVAL);
  CHECK_RC(spright_pool_open("x", 0, NULL), -EINVAL);
  CHECK(strstr(last_error(), "NULL") != NULL);

  snprintf(path, sizeof path, "%s/no/such/dir/pool", dir);
  CHECK_RC(spright_pool_open(path, 16 << 20, &pool), -ENOENT);
  CHECK(strstr(last_error(), "failed to open") != NULL);

  snprintf(path, sizeof path, "%s/small", dir);
  CHECK_RC(spright_pool_open(path, 4096, &pool), -ENOSPC);

  snprintf(path, sizeof path, "%s/garbage", dir);
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  for (int i = 0; i < 100; i++) fputc('x', f);
  fclose(f);
  CHECK_RC(spright_pool_open(path, 0, &pool), -EBADMSG);

  /* A pool written by an SDK of another layout version. */
  snprintf(path, sizeof path, "%s/old", dir);
  CHECK_RC(spright_pool_open(path, 8192 + (4 << 20), &pool), 0);
  spright_pool_close(pool);
  pool = NULL;
  int fd = open(path, O_RDWR);
  CHECK(fd >= 0);
  uint32_t other = SPRIGHT_POOL_VERSION + 6;
  CHECK(pwrite(fd, &other, sizeof other, 8) == (ssize_t)sizeof other);
  close(fd);
  CHECK_RC(spright_pool_open(path, 0, &pool), -EPROTO);
  char want[64];
  snprintf(want, sizeof want, "version %u,", other);
  CHECK(strstr(last_error(), want) != NULL);
  snprintf(want, sizeof want, "reads version %u", SPRIGHT_POOL_VERSION);
  CHECK(strstr(last_error(), want) != NULL);
  CHECK(pool == NULL);

  /* spright_last_error truncates like snprintf and reports the full length. */
  size_t full = spright_last_error(NULL, 0);
  CHECK(full == strlen(last));
  char tiny[5];
  CHECK(spright_last_error(tiny, sizeof tiny) == full);
  CHECK(strlen(tiny) == 4 && strncmp(tiny, last, 4) == 0);
}

static void buffers(spright_pool *pool) {
  spright_buf b;
  spright_descriptor d;
  CHECK_RC(spright_alloc(NULL, 10, &b), -EINVAL);
  CHECK_RC(spright_alloc(pool, 10, NULL), -EINVAL);
  CHECK_RC(spright_alloc(pool, SPRIGHT_MAX_PAYLOAD + 1, &b), -EMSGSIZE);

  CHECK_RC(spright_alloc(pool, 100, &b), 0);
  CHECK(spright_buf_len(&b) == 100);
  CHECK(spright_buf_capacity(&b) == 256);
  uint8_t *p = spright_buf_data(&b);
  CHECK(p != NULL);
  memset(p, 'a', 256);
  CHECK_RC(spright_buf_set_len(&b, 257), -EOVERFLOW);
  CHECK_RC(spright_buf_set_len(&b, 200), 0);
  CHECK(spright_buf_len(&b) == 200);
  CHECK_RC(spright_buf_into_descriptor(&b, NULL), -EINVAL);
  CHECK_RC(spright_buf_into_descriptor(&b, &d), 0);
  CHECK(d.len == 200);

  /* Given up: the spright_buf is empty now. */
  CHECK(spright_buf_data(&b) == NULL);
  CHECK(spright_buf_len(&b) == 0 && spright_buf_capacity(&b) == 0);
  CHECK_RC(spright_buf_set_len(&b, 1), -EINVAL);
  CHECK_RC(spright_buf_into_descriptor(&b, &d), -EINVAL);
  CHECK_RC(spright_buf_release(&b), -EINVAL);
  CHECK_RC(spright_buf_release(NULL), -EINVAL);
  CHECK(spright_buf_data(NULL) == NULL && spright_buf_len(NULL) == 0 &&
        spright_buf_capacity(NULL) == 0);
  spright_buf zero;
  memset(&zero, 0, sizeof zero);
  CHECK_RC(spright_buf_release(&zero), -EINVAL);

  /* Bad descriptors. */
  spright_descriptor bad = d;
  bad.offset = (uint64_t)1 << 40;
  CHECK_RC(spright_take(pool, bad, &b), -ERANGE);
  bad = d;
  bad.offset += 8;
  CHECK_RC(spright_take(pool, bad, &b), -EFAULT);
  bad = d;
  bad.len = 257;
  CHECK_RC(spright_take(pool, bad, &b), -EOVERFLOW);
  bad = d;
  bad.generation += 5;
  CHECK_RC(spright_take(pool, bad, &b), -ESTALE);
  CHECK(strstr(last_error(), "stale descriptor") != NULL);
  CHECK_RC(spright_take(NULL, d, &b), -EINVAL);
  CHECK_RC(spright_take(pool, d, NULL), -EINVAL);

  CHECK_RC(spright_take(pool, d, &b), 0);
  CHECK(spright_buf_len(&b) == 200);
  CHECK(spright_buf_data(&b)[199] == 'a');
  spright_buf again;
  CHECK_RC(spright_take(pool, d, &again), -EALREADY);
  CHECK_RC(spright_buf_release(&b), 0);
  CHECK_RC(spright_take(pool, d, &b), -ESTALE);
  all_free(pool);

  spright_stats s;
  CHECK_RC(spright_pool_stats(NULL, &s), -EINVAL);
  CHECK_RC(spright_pool_stats(pool, NULL), -EINVAL);
}

static void out_of_memory(const char *dir) {
  char path[4096];
  snprintf(path, sizeof path, "%s/one-chunk", dir);
  spright_pool *pool = NULL;
  CHECK_RC(spright_pool_open(path, 8192 + (4 << 20), &pool), 0);
  spright_buf b[3], more;
  for (int i = 0; i < 3; i++)
    CHECK_RC(spright_alloc(pool, SPRIGHT_MAX_PAYLOAD, &b[i]), 0);
  CHECK_RC(spright_alloc(pool, SPRIGHT_MAX_PAYLOAD, &more), -ENOMEM);
  CHECK_RC(spright_alloc(pool, 1, &more), -ENOMEM);
  for (int i = 0; i < 3; i++) CHECK_RC(spright_buf_release(&b[i]), 0);
  CHECK_RC(spright_alloc(pool, SPRIGHT_MAX_PAYLOAD, &more), 0);
  CHECK_RC(spright_buf_release(&more), 0);
  all_free(pool);
  spright_pool_close(pool);
  spright_pool_close(NULL);
}

static void sockets(spright_pool *pool) {
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  spright_buf b;
  spright_descriptor d, got;
  CHECK_RC(spright_alloc(pool, 5, &b), 0);
  memcpy(spright_buf_data(&b), "hello", 5);
  CHECK_RC(spright_buf_into_descriptor(&b, &d), 0);
  CHECK_RC(spright_send(sv[0], d), 0);
  CHECK_RC(spright_recv(sv[1], &got), 1);
  CHECK(got.offset == d.offset && got.len == d.len &&
        got.generation == d.generation);
  CHECK_RC(spright_take(pool, got, &b), 0);
  CHECK(memcmp(spright_buf_data(&b), "hello", 5) == 0);
  CHECK_RC(spright_buf_release(&b), 0);

  CHECK_RC(spright_send(-1, d), -EBADF);
  CHECK_RC(spright_recv(-1, &got), -EBADF);
  CHECK_RC(spright_recv(sv[1], NULL), -EINVAL);
  /* Half a descriptor, then the end: reset. */
  CHECK(write(sv[0], "12345", 5) == 5);
  shutdown(sv[0], SHUT_WR);
  CHECK_RC(spright_recv(sv[1], &got), -ECONNRESET);
  /* A clean end: 0. */
  CHECK_RC(spright_recv(sv[1], &got), 0);
  close(sv[1]);
  /* A closed peer: EPIPE, never SIGPIPE. */
  CHECK_RC(spright_send(sv[0], d), -EPIPE);
  close(sv[0]);
  all_free(pool);
}

/* ---- the event-driven stage ---- */

struct stage {
  spright_pool *pool;
  int listen_fd;
  char next[64];
  int result;
  int stop_on;
  int left_nothing_on;
};

/* Upper-cases the payload; stops on `stop_on`; releases the buffer and
 * returns 0 (an author's bug) on `left_nothing_on`. */
static int upper(void *ctx, spright_buf *buf) {
  struct stage *st = ctx;
  uint8_t *p = spright_buf_data(buf);
  size_t n = spright_buf_len(buf);
  if (n > 0 && p[0] == st->stop_on) return -1000 - st->stop_on;
  if (n > 0 && p[0] == st->left_nothing_on) {
    spright_buf_release(buf);
    return 0;
  }
  for (size_t i = 0; i < n; i++)
    if (p[i] >= 'a' && p[i] <= 'z') p[i] -= 'a' - 'A';
  return 0;
}

static void *run_stage(void *arg) {
  struct stage *st = arg;
  st->result = spright_stage_run(st->pool, st->listen_fd,
                                 st->next[0] ? st->next : NULL, upper, st);
  return NULL;
}

static int listen_loopback(char *addr, size_t cap) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
  CHECK(listen(fd, 16) == 0);
  socklen_t len = sizeof sa;
  CHECK(getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
  snprintf(addr, cap, "127.0.0.1:%u", ntohs(sa.sin_port));
  return fd;
}

static int connect_to(int listen_fd) {
  struct sockaddr_in sa;
  socklen_t len = sizeof sa;
  CHECK(getsockname(listen_fd, (struct sockaddr *)&sa, &len) == 0);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
  return fd;
}

/* Sends `text` down `fd` and returns what came back (rc of recv). */
static int round_trip(spright_pool *pool, int fd, const char *text, char *out,
                      size_t cap) {
  spright_buf b;
  spright_descriptor d;
  size_t n = strlen(text);
  CHECK_RC(spright_alloc(pool, n, &b), 0);
  memcpy(spright_buf_data(&b), text, n);
  CHECK_RC(spright_buf_into_descriptor(&b, &d), 0);
  CHECK_RC(spright_send(fd, d), 0);
  int rc = spright_recv(fd, &d);
  if (rc == 1) {
    CHECK_RC(spright_take(pool, d, &b), 0);
    size_t m = spright_buf_len(&b) < cap - 1 ? spright_buf_len(&b) : cap - 1;
    memcpy(out, spright_buf_data(&b), m);
    out[m] = 0;
    CHECK_RC(spright_buf_release(&b), 0);
  }
  return rc;
}

static void stages(spright_pool *pool) {
  char addr[64], out[64];
  CHECK_RC(spright_stage_run(NULL, 0, NULL, upper, NULL), -EINVAL);
  CHECK_RC(spright_stage_run(pool, 0, NULL, NULL, NULL), -EINVAL);
  CHECK_RC(spright_stage_run(pool, -1, NULL, upper, NULL), -EBADF);
  int l = listen_loopback(addr, sizeof addr);
  CHECK_RC(spright_stage_run(pool, l, "no address", upper, NULL), -EINVAL);

  /* first (upper-cases, stops on '!') -> last (upper-cases, stops on '#',
   * forwards nothing on '?'). */
  struct stage last_st = {pool, l, "", 0, '#', '?'};
  struct stage first_st = {pool, -1, "", 0, '!', 0};
  memcpy(first_st.next, addr, sizeof addr);
  first_st.listen_fd = listen_loopback(addr, sizeof addr);
  pthread_t t1, t2;
  CHECK(pthread_create(&t2, NULL, run_stage, &last_st) == 0);
  CHECK(pthread_create(&t1, NULL, run_stage, &first_st) == 0);

  int c = connect_to(first_st.listen_fd);
  CHECK_RC(round_trip(pool, c, "hello, chain", out, sizeof out), 1);
  CHECK(strcmp(out, "HELLO, CHAIN") == 0);
  CHECK_RC(round_trip(pool, c, "again", out, sizeof out), 1);
  CHECK(strcmp(out, "AGAIN") == 0);
  /* The last stage stops: the first one closes the connections waiting on
   * it; the stopped stage returns its function's code. */
  CHECK_RC(round_trip(pool, c, "#stop", out, sizeof out), 0);
  close(c);
  pthread_join(t2, NULL);
  CHECK_RC(last_st.result, -1000 - '#');

  /* A function that leaves nothing to forward stops its stage with EINVAL. */
  last_st.result = 1;
  CHECK(pthread_create(&t2, NULL, run_stage, &last_st) == 0);
  c = connect_to(first_st.listen_fd);
  CHECK_RC(round_trip(pool, c, "back", out, sizeof out), 1);
  CHECK(strcmp(out, "BACK") == 0);
  CHECK_RC(round_trip(pool, c, "?", out, sizeof out), 0);
  close(c);
  pthread_join(t2, NULL);
  CHECK_RC(last_st.result, -EINVAL);
  CHECK(strstr(last_error(), "left no buffer") == NULL); /* other thread's */

  c = connect_to(first_st.listen_fd);
  CHECK_RC(round_trip(pool, c, "!stop", out, sizeof out), 0);
  close(c);
  pthread_join(t1, NULL);
  CHECK_RC(first_st.result, -1000 - '!');
  close(first_st.listen_fd);
  close(l);
  all_free(pool);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s <scratch directory>\n", argv[0]);
    return 2;
  }
  CHECK(spright_pool_version() == SPRIGHT_POOL_VERSION);
  errors_are_named();
  open_errors(argv[1]);
  char path[4096];
  snprintf(path, sizeof path, "%s/pool", argv[1]);
  spright_pool *pool = NULL;
  CHECK_RC(spright_pool_open(path, 64 << 20, &pool), 0);
  buffers(pool);
  out_of_memory(argv[1]);
  sockets(pool);
  stages(pool);
  spright_pool_close(pool);
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("abi: all checks passed\n");
  return 0;
}
