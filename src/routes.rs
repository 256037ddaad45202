//! Model routing: which backend serves a model, under which upstream name.
//!
//! A [`RouteTable`] is built once per configuration and never changes; a
//! new configuration builds a new table that is swapped in atomically, so a
//! request sees one consistent table from start to end.
//!
//! Matching order, documented for users:
//! 1. an exact rule (`gpt-4o-mini`) wins, whatever its place in the file;
//! 2. otherwise glob rules (`claude-*`, `vendor/*`, `*`) are tried in file
//!    order and the first match wins.
//!
//! In a glob only `*` is special: it matches any run of characters,
//! including `/`, `.` and `:` (model names contain all three).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{BackendUrl, Config};

/// A provider as the data path needs it.
#[derive(Debug)]
pub struct Backend {
    /// The backend's name, also its Envoy cluster's name.
    pub name: Box<str>,
    /// The file its key is read from (never the key itself).
    pub api_key_file: PathBuf,
    pub url: BackendUrl,
    /// The CA bundle an `https` backend is checked against.
    pub ca_file: PathBuf,
}

/// Where one model goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub backend: Arc<Backend>,
    /// The name to put in the body instead of the client's, if any.
    pub upstream_model: Option<Arc<str>>,
    /// The backends tried in order after `backend` when it throttles or
    /// fails; empty for most models (one attempt).
    pub fallbacks: Arc<[Hop]>,
    /// The name of the chain (`backend` then `fallbacks`), also its Envoy
    /// cluster's; `None` without fallbacks.
    pub chain: Option<Arc<str>>,
}

/// One backend of a fallback chain, with the model name it gets.
#[derive(Debug, Clone)]
pub struct Hop {
    pub backend: Arc<Backend>,
    pub upstream_model: Option<Arc<str>>,
}

/// Names a chain's Envoy cluster: `chain~<backend>~<backend>...`. Backend
/// names cannot hold `~`, so two chains never share a name.
pub fn chain_name<'a>(backends: impl IntoIterator<Item = &'a str>) -> String {
    let mut name = String::from("chain");
    for b in backends {
        name.push('~');
        name.push_str(b);
    }
    name
}

impl Route {
    /// Every hop, the primary first.
    pub fn hops(&self) -> impl Iterator<Item = Hop> + '_ {
        std::iter::once(Hop {
            backend: Arc::clone(&self.backend),
            upstream_model: self.upstream_model.clone(),
        })
        .chain(self.fallbacks.iter().cloned())
    }
}

/// All model rules of one configuration.
#[derive(Debug)]
pub struct RouteTable {
    backends: Vec<Arc<Backend>>,
    exact: HashMap<Box<str>, Route>,
    globs: Vec<(Box<str>, Route)>,
    /// Exact names, in file order, for `GET /v1/models`.
    listed: Vec<Box<str>>,
    /// The `*` rule: it serves every model not named otherwise, so its
    /// backend's own model list is the useful answer to `GET /v1/models`.
    catch_all: Option<Route>,
}

impl RouteTable {
    /// Builds the table from a validated configuration.
    pub fn new(config: &Config) -> Self {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| {
                Arc::new(Backend {
                    name: b.name.as_str().into(),
                    api_key_file: b.api_key_file.clone(),
                    url: b.url.clone(),
                    ca_file: b.ca_file.clone(),
                })
            })
            .collect();

        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        let mut listed = Vec::new();
        let mut catch_all = None;
        for rule in &config.models {
            let by_name = |name: &str| backends.iter().find(|b| *b.name == *name).cloned();
            let Some(backend) = by_name(&rule.backend) else {
                continue;
            };
            let fallbacks: Arc<[Hop]> = rule
                .fallbacks
                .iter()
                .filter_map(|f| {
                    Some(Hop {
                        backend: by_name(&f.backend)?,
                        upstream_model: f.upstream_model.as_deref().map(Arc::from),
                    })
                })
                .collect();
            let chain = (!fallbacks.is_empty()).then(|| {
                Arc::from(chain_name(
                    std::iter::once(&*backend.name)
                        .chain(fallbacks.iter().map(|h| &*h.backend.name)),
                ))
            });
            let route = Route {
                backend: Arc::clone(&backend),
                upstream_model: rule.upstream_model.as_deref().map(Arc::from),
                fallbacks,
                chain,
            };
            if rule.name.contains('*') {
                if rule.name == "*" && catch_all.is_none() {
                    catch_all = Some(route.clone());
                }
                globs.push((rule.name.as_str().into(), route));
            } else if !exact.contains_key(rule.name.as_str()) {
                listed.push(rule.name.as_str().into());
                exact.insert(rule.name.as_str().into(), route);
            }
        }
        Self {
            backends,
            exact,
            globs,
            listed,
            catch_all,
        }
    }

    /// The route for `model`, or `None` when no rule matches.
    pub fn resolve(&self, model: &str) -> Option<&Route> {
        self.exact.get(model).or_else(|| {
            self.globs
                .iter()
                .find(|(pattern, _)| glob_match(pattern, model))
                .map(|(_, route)| route)
        })
    }

    /// The `*` rule, whose backend's own model list answers
    /// `GET /v1/models`, if there is one.
    pub fn catch_all(&self) -> Option<&Route> {
        self.catch_all.as_ref()
    }

    /// Model names the gateway lists itself (exact rules, file order).
    pub fn listed_models(&self) -> impl Iterator<Item = &str> {
        self.listed.iter().map(|m| &**m)
    }

    /// Whether `model` is an exactly named model of this table.
    pub fn is_listed(&self, model: &str) -> bool {
        self.exact.contains_key(model)
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }
}

/// `*`-only glob match: `*` stands for any run of characters, every other
/// character for itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let Some((first, tail)) = pattern.split_once('*') else {
        // No `*` at all: the name is the literal.
        return pattern == name;
    };
    let (middles, last) = tail.rsplit_once('*').unwrap_or(("", tail));
    // The literals before the first `*` and after the last one pin the
    // name's ends; they must not overlap.
    let Some(rest) = name.strip_prefix(first) else {
        return false;
    };
    let Some(mut rest) = rest.strip_suffix(last) else {
        return false;
    };
    // Between them, each middle literal in order, each as early as it
    // occurs: if any placement fits, the earliest does. Per request, so
    // nothing is collected.
    for middle in middles.split('*') {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(yaml: &str) -> RouteTable {
        RouteTable::new(&Config::from_text(yaml, Path::new("t.yaml")).unwrap())
    }

    const TWO_BACKENDS: &str = r#"
backends:
  - {name: tars, url: "https://api.router.tetrate.ai", api_key_file: /k/tars}
  - {name: local, url: "http://127.0.0.1:8000", api_key_file: /k/local}
models:
  - {name: "claude-*", backend: tars}
  - {name: "claude-special", backend: local, upstream_model: "special-v2"}
  - {name: "vendor/*", backend: local}
  - {name: "gpt-4o-mini", backend: tars}
  - {name: "*", backend: tars}
"#;

    #[test]
    fn exact_wins_over_earlier_glob() {
        let t = table(TWO_BACKENDS);
        let r = t.resolve("claude-special").unwrap();
        assert_eq!(&*r.backend.name, "local");
        assert_eq!(r.upstream_model.as_deref(), Some("special-v2"));
    }

    #[test]
    fn globs_in_file_order() {
        let t = table(TWO_BACKENDS);
        assert_eq!(
            &*t.resolve("claude-sonnet-4-20250514").unwrap().backend.name,
            "tars"
        );
        assert_eq!(
            &*t.resolve("vendor/model:v1.2").unwrap().backend.name,
            "local"
        );
        assert_eq!(&*t.resolve("xai/grok-4.5").unwrap().backend.name, "tars");
        assert_eq!(t.catch_all().map(|r| &*r.backend.name), Some("tars"));
    }

    #[test]
    fn no_match_without_catch_all() {
        let t = table(
            "backends: [{name: a, url: 'http://h', api_key_file: k}]\nmodels: [{name: 'gpt-*', backend: a}]\n",
        );
        assert!(t.resolve("claude").is_none());
        assert!(t.resolve("gpt-").is_some());
        assert!(t.catch_all().is_none());
        assert_eq!(t.listed_models().count(), 0);
    }

    #[test]
    fn listed_models_are_exact_rules_in_order() {
        let t = table(TWO_BACKENDS);
        let listed: Vec<&str> = t.listed_models().collect();
        assert_eq!(listed, ["claude-special", "gpt-4o-mini"]);
        assert!(t.is_listed("gpt-4o-mini"));
        assert!(!t.is_listed("claude-x"));
    }

    #[test]
    fn glob_semantics() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "a/b.c:d"));
        assert!(glob_match("a*", "a"));
        assert!(glob_match("a*c", "abc"));
        assert!(glob_match("a*c", "ac"));
        assert!(!glob_match("a*c", "ab"));
        assert!(glob_match("*/*", "xai/grok-4.5"));
        assert!(!glob_match("*/*", "grok"));
        assert!(glob_match("a*b*a", "aba"));
        assert!(!glob_match("a*b*a", "ab"));
        assert!(glob_match("*-mini", "gpt-4o-mini"));
        assert!(!glob_match("gpt", "gpt-4"));
        assert!(glob_match("gpt", "gpt"));
        // Overlap between prefix and suffix must not count twice.
        assert!(!glob_match("ab*ba", "aba"));
    }

    /// Every pattern and name over a small alphabet, against a matcher
    /// that tries every split (slow, obviously right).
    #[test]
    fn glob_agrees_with_trying_every_split() {
        fn reference(p: &[u8], n: &[u8]) -> bool {
            match p.split_first() {
                None => n.is_empty(),
                Some((b'*', p)) => (0..=n.len()).any(|i| reference(p, &n[i..])),
                Some((c, p)) => n.first() == Some(c) && reference(p, &n[1..]),
            }
        }
        fn words(alphabet: &[u8], max: usize) -> Vec<String> {
            let mut all = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|w| alphabet.iter().map(move |&c| format!("{w}{}", c as char)))
                    .collect();
                all.extend(last.iter().cloned());
            }
            all
        }
        let names = words(b"ab", 5);
        for pattern in words(b"ab*", 5) {
            for name in &names {
                assert_eq!(
                    glob_match(&pattern, name),
                    reference(pattern.as_bytes(), name.as_bytes()),
                    "{pattern:?} against {name:?}"
                );
            }
        }
    }
}
