//! `xmatrix::parse` on arbitrary header values: never panics, and whatever it accepts it reads
//! back the same from the form it writes (`Display`, Synapse's form).
#![no_main]

use federation::xmatrix;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let value = String::from_utf8_lossy(data);
    if let Ok(parsed) = xmatrix::parse(&value) {
        let written = parsed.to_string();
        assert_eq!(
            xmatrix::parse(&written).as_ref(),
            Ok(&parsed),
            "{written:?}"
        );
    }
});
