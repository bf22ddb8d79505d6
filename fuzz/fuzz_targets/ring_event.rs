//! A ring buffer item, as the kernel programs write them, becomes a record and its log line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netiso::cli::LogFormat;
use netiso::datapath::{event_counters, read_event, tuple_record};
use netiso::export::log::RecordWriter;

fuzz_target!(|item: &[u8]| {
    let Some(event) = read_event(item) else { return };
    let (kind, counters) = event_counters(&event);
    let record = tuple_record(kind, &event.tuple, &counters).with_change(true, 1, u64::from(event.len));
    for format in [LogFormat::Json, LogFormat::Text] {
        let mut line = Vec::new();
        RecordWriter::new(format).write(&mut line, &record).expect("writing to memory");
    }
});
