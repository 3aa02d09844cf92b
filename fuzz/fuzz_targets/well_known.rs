//! `discovery::parse_well_known` on arbitrary bodies: never panics, and what it accepts is a
//! server name `discovery` can resolve (it parses as one).
#![no_main]

use federation::discovery;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(server) = discovery::parse_well_known(data) {
        assert!(discovery::parse_server_name(&server).is_ok(), "{server:?}");
    }
});
