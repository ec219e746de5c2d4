//! # virtq-vhost-user — a vhost-user backend library for Linux
//!
//! Turns the `virtq` core into a vhost-user back-end (the role DPDK's librte_vhost plays for
//! OVS): the protocol, connections with fd passing, the front-end's memory table, vrings and
//! their state machine, and a device API with burst operations.
//!
//! Modules mirror QEMU's `docs/interop/vhost-user.rst`:
//!
//! | module | what |
//! |---|---|
//! | [`message`] | header, the request table (one list: codes, names, payload / fd / reply rules), payload decoding with fds, replies, errors |
//! | [`connection`] | unix sockets (server and client with reconnect), framing, SCM_RIGHTS |
//! | [`memory`] | memory table: mmap'd regions, `virtq::GuestMemory` for guest physical and front-end virtual addresses; the dirty page log ([`memory::dirty`]) |
//! | [`vring`] | per-ring state: started/stopped × enabled/disabled, kick/call/err fds |
//! | [`model`] | the device model trait: what a device type (net, blk, …) decides — features, config space, queues and ready rule, device-type requests |
//! | [`net`] | virtio-net: its device model ([`net::NetModel`]) and data path (dequeue/enqueue bursts, per-queue counters) |
//! | [`device`] | the protocol state machine, generic over the device model: every request applied to the device state and answered |
//! | [`backend`] | the control loop: many sockets on one mio poll, callbacks, reconnect, teardown |
#![deny(missing_docs, unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod connection;
pub mod device;
#[cfg(test)]
mod fd_probe;
pub mod memory;
pub mod message;
pub mod model;
pub mod net;
pub mod ratelimit;
pub mod vring;
