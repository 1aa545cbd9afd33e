//! Empty library target: it lets `ebpf/loader` name this crate as a build
//! dependency, so cargo rebuilds the loader whenever the programs change.
#![no_std]
