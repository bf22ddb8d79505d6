//! Checks the capabilities loading and attaching need before trying, so a missing privilege is
//! named instead of surfacing as a verifier or perf_event error.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities from a `/proc/<pid>/status` text.
fn effective(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities netiso needs and lacks (CAP_SYS_ADMIN stands in for BPF and PERFMON, as on
/// kernels before 5.8).
pub fn missing_from(status: &str) -> Vec<&'static str> {
    let Some(caps) = effective(status) else { return vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] };
    let has = |cap: u32| caps & (1 << cap) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

pub fn missing() -> Vec<&'static str> {
    missing_from(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
}

/// Whether a `/proc/<pid>/status` text says a seccomp filter is in force (mode 2).
fn seccomp_filtered_from(status: &str) -> bool {
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).is_some_and(|mode| mode.trim() == "2")
}

/// Whether this process runs under a seccomp filter, which may refuse bpf() whatever its
/// capabilities.
pub fn seccomp_filtered() -> bool {
    seccomp_filtered_from(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seccomp_filter_is_told_from_none() {
        assert!(seccomp_filtered_from("Name:\tnetiso\nSeccomp:\t2\nSeccomp_filters:\t1\n"));
        assert!(!seccomp_filtered_from("Seccomp:\t0\n"));
        assert!(!seccomp_filtered_from("Name:\tnetiso\n"));
    }

    #[test]
    fn names_what_is_missing() {
        assert!(missing_from("Name:\tnetiso\nCapEff:\t000001ffffffffff\n").is_empty());
        assert_eq!(missing_from("CapEff:\t0000000000000000\n"), ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        let bpf_perfmon_netadmin = (1u64 << 39) | (1 << 38) | (1 << 12);
        assert!(missing_from(&format!("CapEff:\t{bpf_perfmon_netadmin:016x}\n")).is_empty());
        assert_eq!(missing_from(&format!("CapEff:\t{:016x}\n", 1u64 << 21)), ["CAP_NET_ADMIN"]);
    }
}
