//! Logging of malformed guest input without std: through `defmt` when the `defmt` feature is on,
//! otherwise compiled out. The typed error always reaches the caller, which may log it itself.

#[cfg(feature = "defmt")]
macro_rules! log_warn {
    ($($arg:tt)*) => { defmt::warn!($($arg)*) };
}

#[cfg(not(feature = "defmt"))]
macro_rules! log_warn {
    ($($arg:tt)*) => {{}};
}

pub(crate) use log_warn;
