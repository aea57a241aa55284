//! The commands a service runs at each phase: its configuration's, or its kind's defaults
//! (SPEC 8a).

use crate::config::{Service, ServiceKind};

/// The resolved commands and paths of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hooks {
    /// In the new release directory, at its final path, before the switch.
    pub finalize: Vec<String>,
    /// On the one `migrate` node, in the new release directory, before the switch.
    pub migrate: Vec<String>,
    /// In `current`, after the switch (and after a switch back).
    pub reload: Vec<String>,
    /// Paths left writable when a release is made read-only.
    pub writable: Vec<String>,
}

impl Hooks {
    pub fn of(service: &Service) -> Hooks {
        let defaults = match service.kind {
            ServiceKind::Laravel => Hooks {
                finalize: vec!["php artisan optimize".into()],
                migrate: vec!["php artisan migrate --force".into()],
                reload: vec!["apachectl -k graceful".into(), "php artisan queue:restart".into()],
                writable: vec!["bootstrap/cache".into()],
            },
            ServiceKind::Node => Hooks {
                finalize: vec![],
                migrate: vec![],
                reload: vec![format!("pm2 reload {}", service.pm2_app.as_deref().unwrap_or(&service.name))],
                writable: vec![],
            },
            ServiceKind::Generic => Hooks { finalize: vec![], migrate: vec![], reload: vec![], writable: vec![] },
        };
        let hooks = &service.hooks;
        Hooks {
            finalize: hooks.finalize.clone().unwrap_or(defaults.finalize),
            migrate: hooks.migrate.clone().unwrap_or(defaults.migrate),
            reload: hooks.reload.clone().unwrap_or(defaults.reload),
            writable: defaults.writable,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use crate::config::{Config, Overrides};

    fn load_text(text: &str) -> Config {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        Config::load(Some(file.path()), &Overrides::default()).unwrap()
    }

    #[test]
    fn the_default_reload_of_a_node_service_reloads_its_pm2_app() {
        let config = load_text(
            "[service.web]\nkind = \"node\"\n[service.shop]\nkind = \"node\"\npm2_app = \"shop-frontend.v2\"\n",
        );
        assert_eq!(super::Hooks::of(config.service("web").unwrap()).reload, ["pm2 reload web"]);
        assert_eq!(super::Hooks::of(config.service("shop").unwrap()).reload, ["pm2 reload shop-frontend.v2"]);
    }
}
