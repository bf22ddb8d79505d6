//! A short storm in the lab: develop/debug scans production/api and floods one of its blocked
//! ports, faster than the drop map could hold at its usual idle timeout. Counts and losses are
//! asserted, not times (`cargo xtask bench storm` measures those).

use std::path::Path;

use xtask::lab;
use xtask::storm::{self, Options};

#[test]
fn a_scan_and_a_flood_lose_no_event_every_dropped_packet_is_counted_and_recorded_and_both_are_summarised() {
    let (lab, _scratch) = lab::for_test("st", Path::new(env!("CARGO_BIN_EXE_xtask")));
    let netiso = xtask::build::netiso(false).expect("netiso builds");
    // 2,000 new keys in four seconds into a 1,024-key drop map read every 250 ms: at the usual
    // idle timeout (a minute) the map fills and later drops are recorded one by one
    // (drop_map_full); with room made under pressure about 400 keys are ever in it.
    let options = Options { rate: 500, ports: 1000, attempts: 1000 };
    let args = ["--drop-map-entries", "1024", "--drain-interval", "250ms"];
    let figures = storm::run(&lab, &netiso, &options, &args).expect("the storm runs");
    assert_eq!(figures.attempts_sent, 2000);
    assert_eq!(figures.lost_events, 0, "lost by cause: {:?}", figures.lost_by_cause);
    // Each attempt is a new key in the drop map and in the flow map: the first new key after a
    // drain is announced, not every one (one record per key was 4,000).
    assert!(figures.ring_events < 500, "{} ring-buffer records for 4,000 new keys", figures.ring_events);
    assert_eq!(figures.netiso_dropped, figures.nft_dropped, "netiso counts what nftables dropped");
    assert_eq!(figures.nft_dropped, 2000);
    assert_eq!(figures.recorded_drops, 2000, "every dropped packet is in a record");
    // Attempts are counted by source port: the kernel may hand a closed socket's port out again
    // at once, and a SYN from a port already counted is a packet of that attempt (the packets
    // are all accounted above).
    assert!(
        (1..=1000).contains(&figures.flood_attempts_recorded),
        "{} attempts at the flooded port",
        figures.flood_attempts_recorded
    );
    assert!(figures.flood_records <= 1, "the flood is one record, not {}", figures.flood_records);
    // The scan: its first ports are records of their own (with the port the quiet baseline's
    // blocked probe tried just before), the rest one summary.
    let recorded_one_by_one = u64::from(netiso::evidence::correlate::SCAN_RECORDED_PORTS);
    assert_eq!(figures.scan_summaries, 1);
    assert!(
        (1000 - recorded_one_by_one..1000).contains(&figures.summarised_ports),
        "{} ports summarised",
        figures.summarised_ports
    );
    assert_eq!(figures.pre_storm_kept, figures.pre_storm_records, "the records from before are kept");
}
