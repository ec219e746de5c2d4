//! Replies ("Communication": the reply header, `REPLY_ACK`) and the back-end's own messages
//! ("Back-end message types"), encoded ready to send.

use super::{Header, Inflight, Request, CONFIG_HEADER_SIZE, HEADER_SIZE, MAX_CONFIG_SIZE, VERSION_1};

/// A complete reply message: [`Header::reply`] (version 1 | [`FLAG_REPLY`](super::FLAG_REPLY), `size`) followed by
/// `payload`. A payload longer than `u32::MAX` bytes (never produced by this crate) is cut to
/// `u32::MAX` bytes so that the header always matches what is sent.
pub fn encode_reply(request: Request, payload: &[u8]) -> Vec<u8> {
    let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let payload = payload.get(..size as usize).unwrap_or(payload);
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    out.extend_from_slice(&Header::reply(request, size).to_bytes());
    out.extend_from_slice(payload);
    out
}

/// A `u64` reply: `GET_FEATURES`, `GET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM`,
/// `GET_MAX_MEM_SLOTS`, `POSTCOPY_END`, `CHECK_DEVICE_STATE`, `SET_DEVICE_STATE_FD` (bits 0–7
/// status, bit 8 invalid FD), and `REPLY_ACK` statuses (see [`encode_ack`]).
pub fn encode_u64_reply(request: Request, value: u64) -> Vec<u8> {
    encode_reply(request, &value.to_ne_bytes())
}

/// A `REPLY_ACK` reply ("The payload should be set to zero on success or non-zero on
/// failure"): `u64` 0 on success, 1 on failure. Also the reply to `IOTLB_MSG` and, by this
/// crate's convention, to `SET_LOG_BASE` (whose reply body the spec leaves undefined).
pub fn encode_ack(request: Request, success: bool) -> Vec<u8> {
    encode_u64_reply(request, u64::from(!success))
}

/// A "vring state description" reply `{index, num}`: `GET_VRING_BASE`.
pub fn encode_vring_state_reply(request: Request, index: u32, num: u32) -> Vec<u8> {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&index.to_ne_bytes());
    payload[4..].copy_from_slice(&num.to_ne_bytes());
    encode_reply(request, &payload)
}

/// A successful `GET_CONFIG` reply: the request's `offset` and `flags`, `size = data.len()`,
/// then `data`. The spec requires "payload size MUST match the front-end's request": pass
/// exactly the requested number of bytes. `data` longer than [`MAX_CONFIG_SIZE`] yields the
/// error reply instead ([`encode_get_config_error`]).
pub fn encode_get_config_reply(offset: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let size = match u32::try_from(data.len()) {
        Ok(size) if size <= MAX_CONFIG_SIZE => size,
        _ => return encode_get_config_error(),
    };
    let mut payload = Vec::with_capacity(CONFIG_HEADER_SIZE + data.len());
    payload.extend_from_slice(&offset.to_ne_bytes());
    payload.extend_from_slice(&size.to_ne_bytes());
    payload.extend_from_slice(&flags.to_ne_bytes());
    payload.extend_from_slice(data);
    encode_reply(Request::GetConfig, &payload)
}

/// A failed `GET_CONFIG` reply: "vhost-user back-end uses zero length of payload to indicate an
/// error" — a header with `size = 0` and no payload (what libvhost-user and DPDK send).
pub fn encode_get_config_error() -> Vec<u8> {
    encode_reply(Request::GetConfig, &[])
}

/// `GET_STATUS` reply: the device status byte as a `u64`.
pub fn encode_get_status_reply(status: u8) -> Vec<u8> {
    encode_u64_reply(Request::GetStatus, u64::from(status))
}

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (id 2; "Back-end message types"), sent by the back-end
/// on the channel of `SET_BACKEND_REQ_FD`: the device's configuration space changed, and the
/// front-end may re-read it with `GET_CONFIG`. Only with `CONFIG` and `BACKEND_REQ` negotiated.
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

/// A back-end request without payload and without `NEED_REPLY` (so that the back-end never
/// waits for the front-end): version 1, `size` 0.
pub fn encode_backend_request(request: u32) -> Vec<u8> {
    Header { request, flags: VERSION_1, size: 0 }.to_bytes().to_vec()
}

/// `GET_INFLIGHT_FD` reply: the inflight description (24 bytes); the buffer's fd goes in the
/// ancillary data of the same `sendmsg`.
pub fn encode_get_inflight_fd_reply(inflight: &Inflight) -> Vec<u8> {
    encode_reply(Request::GetInflightFd, &inflight.to_bytes())
}
