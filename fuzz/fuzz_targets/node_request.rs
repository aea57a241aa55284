//! The node protocol decoder (`release::node::decode_request`, what `release node` makes of
//! its stdin) on any bytes: an answer, never a panic; a request it accepts survives the trip
//! the server's requests take (serialized, sent, decoded) unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use release::node::{ErrorCode, answer, decode_request};

fuzz_target!(|data: &[u8]| {
    match decode_request(data) {
        Ok(request) => {
            let sent = serde_json::to_vec(&request).expect("a request serializes");
            let again = decode_request(&sent).expect("a serialized request decodes");
            assert_eq!(serde_json::to_vec(&again).expect("serializes"), sent);
        }
        Err(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            // The refusal goes back as one JSON line.
            assert!(!answer(Err(e)).to_string().contains('\n'));
        }
    }
});
