#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshca_fuzz::pcr(data);
});
