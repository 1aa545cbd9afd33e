//! spright-shm: zero-copy hops between chained functions (work in progress).
