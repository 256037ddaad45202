//! The ext_proc message decoder that leaves bodies and header maps in
//! place reads every input exactly as prost does: the same message, body
//! and headers, or an error where prost has one. Each input is tried as a
//! whole message, as the payload of a request body message, as a body
//! followed by the input as further fields, as the payload of a headers
//! message and as a header map's payload, so the fuzzer reaches the
//! in-place paths without having to find the wire format first.
#![no_main]

use ai_gateway_extproc::extproc::inbound::{decode, Inbound};
use bytes::Bytes;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn field(number: usize, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encode_length_delimiter((number << 3) | 2, &mut out).unwrap();
    prost::encode_length_delimiter(value.len(), &mut out).unwrap();
    out.extend_from_slice(value);
    out
}

fn same_as_prost(encoded: &[u8]) {
    let ours = decode(&mut Bytes::copy_from_slice(encoded));
    let prost = ProcessingRequest::decode(encoded).map(Inbound::from);
    match (ours, prost) {
        (Ok(ours), Ok(prost)) => assert_eq!(ours, prost),
        (Err(_), Err(_)) => {}
        (ours, prost) => panic!("decoded {ours:?}, prost {prost:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    same_as_prost(data);
    same_as_prost(&field(4, data));
    same_as_prost(&[field(5, &field(1, b"data: {}\n\n")), data.to_vec()].concat());
    same_as_prost(&field(2, data));
    same_as_prost(&field(3, &field(1, data)));
});
