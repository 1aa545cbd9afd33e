/* A stage of the SDK's example chain written in C: the same function and
 * the same command line as `spright-shm-chain stage` (shm-csi/sdk/src/bin/
 * chain.rs), so the demo's chain can put it between Rust functions
 * (`spright-demo --sdk-langs rust,c,...`).
 *
 *   chain_stage --listen ADDR [--next ADDR] --region DIR [--work ROUNDS]
 *
 * A complete, minimal function: it receives each payload's descriptor,
 * does the function's work on the payload where it lies in shared memory
 * (a pointer into the pool, no copy) and forwards the descriptor to --next,
 * or answers the sender when there is no --next (the chain's last stage).
 * The work is exactly spright_shm::work::apply's: hash the payload ROUNDS
 * times (64-bit FNV-1a, each round from the last one's value), then ASCII
 * upper-case it in place; nothing at all with ROUNDS 0.
 *
 * Build: cc chain_stage.c $(pkg-config --cflags --libs spright_shm) -o chain_stage */
/* getaddrinfo and friends under -std=c11. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "spright_shm.h"

#define USAGE \
  "usage: chain_stage --listen ADDR [--next ADDR] --region DIR [--work ROUNDS]\n"

#define FNV_START UINT64_C(0xcbf29ce484222325)
#define FNV_PRIME UINT64_C(0x00000100000001b3)

/* Where each payload's last hash goes, so no round can be optimised away. */
static volatile uint64_t sink;

/* spright_shm::work::apply: `rounds` chained FNV-1a hashes, then ASCII
 * upper case in place; rounds == 0 does nothing. */
static uint64_t work_apply(uint8_t *p, size_t n, uint32_t rounds) {
  uint64_t h = FNV_START;
  if (rounds == 0) return h;
  for (uint32_t r = 0; r < rounds; r++)
    for (size_t i = 0; i < n; i++) {
      h ^= p[i];
      h *= FNV_PRIME;
    }
  for (size_t i = 0; i < n; i++)
    if (p[i] >= 'a' && p[i] <= 'z') p[i] = (uint8_t)(p[i] - ('a' - 'A'));
  return h;
}

static int stage(void *ctx, spright_buf *buf) {
  uint32_t rounds = *(const uint32_t *)ctx;
  sink = work_apply(spright_buf_data(buf), spright_buf_len(buf), rounds);
  return 0; /* forward buf */
}

/* A listening TCP socket on "host:port" ("[v6]:port" for IPv6), with
 * SO_REUSEADDR as Rust's TcpListener::bind sets it. */
static int listen_on(const char *addr) {
  char host[256];
  const char *colon = strrchr(addr, ':');
  size_t hlen = colon ? (size_t)(colon - addr) : 0;
  if (!colon || hlen >= sizeof host || colon[1] == '\0') {
    fprintf(stderr, "--listen %s: expected HOST:PORT\n", addr);
    return -1;
  }
  memcpy(host, addr, hlen);
  host[hlen] = '\0';
  char *h = host;
  if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') {
    host[hlen - 1] = '\0';
    h = host + 1;
  }
  struct addrinfo hints, *res;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  int gai = getaddrinfo(h, colon + 1, &hints, &res);
  if (gai != 0) {
    fprintf(stderr, "--listen %s: %s\n", addr, gai_strerror(gai));
    return -1;
  }
  int fd = socket(res->ai_family, SOCK_STREAM, 0);
  int one = 1;
  if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
      bind(fd, res->ai_addr, res->ai_addrlen) || listen(fd, SOMAXCONN)) {
    fprintf(stderr, "--listen %s: %s\n", addr, strerror(errno));
    freeaddrinfo(res);
    if (fd >= 0) close(fd);
    return -1;
  }
  freeaddrinfo(res);
  return fd;
}

/* The bound address as "host:port", as Rust prints a SocketAddr. */
static void print_listening(int fd) {
  struct sockaddr_storage sa;
  socklen_t len = sizeof sa;
  char host[64], port[16]; /* an IPv6 address is at most 45 characters */
  if (getsockname(fd, (struct sockaddr *)&sa, &len) ||
      getnameinfo((struct sockaddr *)&sa, len, host, sizeof host, port,
                  sizeof port, NI_NUMERICHOST | NI_NUMERICSERV)) {
    printf("listening\n");
  } else if (sa.ss_family == AF_INET6) {
    printf("listening [%s]:%s\n", host, port);
  } else {
    printf("listening %s:%s\n", host, port);
  }
  fflush(stdout);
}

int main(int argc, char **argv) {
  const char *listen_addr = NULL, *next = NULL, *region = NULL;
  uint32_t rounds = 0;
  for (int i = 1; i < argc; i += 2) {
    const char *flag = argv[i];
    if (i + 1 >= argc) {
      fprintf(stderr, "%s needs a value\n" USAGE, flag);
      return 2;
    }
    const char *v = argv[i + 1];
    if (strcmp(flag, "--listen") == 0) {
      listen_addr = v;
    } else if (strcmp(flag, "--next") == 0) {
      next = v;
    } else if (strcmp(flag, "--region") == 0) {
      region = v;
    } else if (strcmp(flag, "--work") == 0) {
      char *end;
      errno = 0;
      unsigned long n = strtoul(v, &end, 10);
      if (errno || *v < '0' || *v > '9' || *end != '\0' || n > UINT32_MAX) {
        fprintf(stderr, "--work %s: not a number of rounds (0 to %u)\n" USAGE,
                v, (unsigned)UINT32_MAX);
        return 2;
      }
      rounds = (uint32_t)n;
    } else {
      fprintf(stderr, "unknown flag %s\n" USAGE, flag);
      return 2;
    }
  }
  if (!listen_addr || !region) {
    fprintf(stderr, "%s is required\n" USAGE,
            listen_addr ? "--region" : "--listen");
    return 2;
  }

  spright_pool *pool;
  int rc = spright_pool_open(region, 0, &pool);
  if (rc < 0) {
    char why[512];
    spright_last_error(why, sizeof why);
    fprintf(stderr, "opening the pool in %s: %s\n%s\n", region,
            spright_strerror(rc), why);
    return 1;
  }
  int fd = listen_on(listen_addr);
  if (fd < 0) return 1;
  print_listening(fd);
  rc = spright_stage_run(pool, fd, next, stage, &rounds);
  char why[512];
  spright_last_error(why, sizeof why);
  fprintf(stderr, "stage stopped: %s\n%s\n", spright_strerror(rc), why);
  return 1;
}
