//! The configuration parser (`Config::from_toml`) on any text: an answer, never a panic; a
//! configuration it accepts is one the server can use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use release::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::from_toml(text) else { return };
    // What the server derives from an accepted configuration at start-up and per request.
    let _ = config.registry_path();
    for environment in &config.environments {
        for service in config.services.values() {
            let _ = service.config_digest(environment);
            let _ = service.health_proves_digest();
        }
        if let Some(from) = &environment.promote_from {
            assert!(config.environments.iter().any(|e| &e.name == from), "promote_from {from:?} is not an environment");
        }
    }
    for (name, service) in &config.services {
        assert_eq!(config.service(name).map(|s| &s.name), Some(&service.name));
    }
});
