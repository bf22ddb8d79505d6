//! The kernel programs' diagnostics (aya-log, on rare paths only: map full, ring buffer full,
//! packets not parsed) forwarded into tracing at debug level, under the target `netiso::kernel`.
//! They are compiled in only when that target's debug level is on (`NETISO_LOG=netiso::kernel=debug`):
//! otherwise the programs load with logging off, and the verifier prunes the log code.

use aya::Ebpf;
use aya_log::EbpfLogger;

/// The tracing target of the kernel's diagnostics.
pub const TARGET: &str = "netiso::kernel";

/// The programs' log level, set before loading (`AYA_LOG_LEVEL`): debug when the diagnostics
/// would be shown, else off.
pub fn level() -> u8 {
    if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) { aya_log::Level::Debug as u8 } else { 0 }
}

/// Forwards one aya-log record into tracing.
pub struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: TARGET, kernel_level = %record.level(), "{}", record.args());
    }

    fn flush(&self) {}
}

/// The reader of the programs' log ring buffer, once the programs are loaded (it takes the map);
/// none when logging is off or the object has no log map.
pub fn reader(ebpf: &mut Ebpf, level: u8) -> Option<EbpfLogger<Forward>> {
    if level == 0 {
        return None;
    }
    EbpfLogger::init_with_logger(ebpf, Forward)
        .inspect_err(|e| tracing::warn!(error = %e, "the kernel programs' diagnostics cannot be read"))
        .ok()
}
