//! `virtq-net` as a library: the data plane (switch, TAP, reflect and benchmark back-ends) and
//! the port configuration the `virtq-net` binary builds its devices from. Benchmarks and tests
//! drive the same code in-process.

pub mod dataplane;
pub mod generate;
pub mod nic;
pub mod port;
pub mod switch;
pub mod tap;
