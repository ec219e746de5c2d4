//! `virtq-net` as a library: the data plane (switch, TAP, NIC uplinks, reflect and benchmark
//! back-ends), the port manager and control socket, and the port configuration the
//! `virtq-net` binary builds its devices from. Benchmarks and tests
//! drive the same code in-process.

pub mod control;
pub mod dataplane;
pub mod generate;
pub mod manager;
pub mod nic;
pub mod port;
pub mod switch;
pub mod tap;
