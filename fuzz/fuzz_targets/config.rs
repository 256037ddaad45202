//! The config parser: never panics, and a config it accepts can be routed
//! and rendered into an Envoy bootstrap.
#![no_main]

use std::path::Path;

use ai_gateway_extproc::config::Config;
use ai_gateway_extproc::envoy_config;
use ai_gateway_extproc::routes::RouteTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_text(text, Path::new("fuzz.yaml")) {
        let table = RouteTable::new(&config);
        assert_eq!(table.backends().len(), config.backends.len());
        match envoy_config::render(&config) {
            // The ext_proc secret is a file the fuzzer cannot provide.
            Ok(_) | Err(envoy_config::RenderError::Secret(_)) => {}
            Err(e) => panic!("a valid config must render: {e}"),
        }
    }
});
