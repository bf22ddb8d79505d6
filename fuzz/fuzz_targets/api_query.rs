//! The query string of `GET /v1/flows`, decoded as the HTTP layer does, then read as a query.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use netiso::export::http::parse_query;

fuzz_target!(|query: &str| {
    let Ok(params) = serde_urlencoded::from_str::<HashMap<String, String>>(query) else { return };
    let _ = parse_query(&params);
});
