//! `keyring::parse_server_keys` on arbitrary bodies (`GET /_matrix/key/v2/server` answers):
//! never panics; without a valid self-signature nothing is accepted.
#![no_main]

use federation::keyring;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The seed is an answer signedjson signed, so the signature checks run too.
    let _ = keyring::parse_server_keys(data, "example.org", 1_700_000_000_000);
});
