//! The route table for the playbook's "own webserver" setup: nginx and Caddy configuration that
//! sends the media repo's paths to it and everything else on the homeserver's hosts to the
//! homeserver, from the same routers (and the same rules) that Traefik gets.
//!
//! A router's rule is Traefik's; what nginx and Caddy can express of it is a host and one or more
//! path matchers. A rule that says more (`!`, `||` across hosts, other matchers) is left out with
//! a comment and a warning naming its variable, never guessed at.

use base64::Engine as _;
use serde::Serialize;

use crate::routes::{METRICS_SERVICE, Route, RouteTable, SERVICE, Side};
use crate::settings::Reader;

const VAR: &str = "matrix_media_repo_webserver_";

/// A Traefik v3 rule: matchers combined with `&&`, `||`, `!` and parentheses.
#[derive(Debug, Clone)]
pub enum Rule {
    Host(String),
    Path(String),
    PathPrefix(String),
    /// Unanchored, in Go's RE2 syntax (which Rust's `regex`, Caddy's and, for the patterns routes
    /// use, nginx's PCRE share).
    PathRegexp(regex::Regex),
    And(Box<Rule>, Box<Rule>),
    Or(Box<Rule>, Box<Rule>),
    Not(Box<Rule>),
}

impl Rule {
    pub fn parse(rule: &str) -> Result<Rule, String> {
        let mut p = Parser { rest: rule };
        let r = p.or()?;
        if !p.rest.trim().is_empty() {
            return Err(format!("unexpected {:?} after the rule", p.rest.trim()));
        }
        Ok(r)
    }

    /// Whether Traefik would match a request for `host` and `path` with this rule.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        match self {
            Rule::Host(h) => h.eq_ignore_ascii_case(host),
            Rule::Path(p) => p == path,
            Rule::PathPrefix(p) => path.starts_with(p.as_str()),
            Rule::PathRegexp(re) => re.is_match(path),
            Rule::And(a, b) => a.matches(host, path) && b.matches(host, path),
            Rule::Or(a, b) => a.matches(host, path) || b.matches(host, path),
            Rule::Not(r) => !r.matches(host, path),
        }
    }

    /// The rule as a host (if any) and path matchers any of which selects it.
    fn split(&self) -> Result<(Option<String>, Vec<PathMatch>), String> {
        let mut terms = Vec::new();
        self.conjuncts(&mut terms);
        let mut host = None;
        let mut paths = None;
        for term in terms {
            match term {
                Rule::Host(h) if host.is_none() => host = Some(h.clone()),
                Rule::Host(_) => return Err("more than one Host matcher".into()),
                other if paths.is_none() => paths = Some(other.paths()?),
                _ => return Err("more than one path matcher joined with &&".into()),
            }
        }
        Ok((
            host,
            paths.unwrap_or_else(|| vec![PathMatch::Prefix("/".into())]),
        ))
    }

    fn conjuncts<'a>(&'a self, out: &mut Vec<&'a Rule>) {
        match self {
            Rule::And(a, b) => {
                a.conjuncts(out);
                b.conjuncts(out);
            }
            other => out.push(other),
        }
    }

    fn paths(&self) -> Result<Vec<PathMatch>, String> {
        match self {
            Rule::Path(p) => Ok(vec![PathMatch::Exact(p.clone())]),
            Rule::PathPrefix(p) => Ok(vec![PathMatch::Prefix(p.clone())]),
            Rule::PathRegexp(re) => Ok(vec![PathMatch::Regex(re.as_str().to_owned())]),
            Rule::Or(a, b) => Ok([a.paths()?, b.paths()?].concat()),
            Rule::Host(_) => Err("a Host matcher inside ||".into()),
            Rule::And(..) => Err("&& inside ||".into()),
            Rule::Not(_) => Err("a negated matcher (!)".into()),
        }
    }
}

struct Parser<'a> {
    rest: &'a str,
}

impl Parser<'_> {
    fn eat(&mut self, token: &str) -> bool {
        self.rest = self.rest.trim_start();
        match self.rest.strip_prefix(token) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn or(&mut self) -> Result<Rule, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Rule::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Rule, String> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            left = Rule::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Rule, String> {
        if self.eat("!") {
            return Ok(Rule::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let r = self.or()?;
            if !self.eat(")") {
                return Err(format!("a missing `)` before {:?}", self.rest));
            }
            return Ok(r);
        }
        let Some(name_end) = self.rest.find('(') else {
            return Err(format!("a matcher expected at {:?}", self.rest));
        };
        let name = self.rest[..name_end].trim().to_owned();
        self.rest = &self.rest[name_end + 1..];
        if !self.eat("`") {
            return Err(format!("{name} needs a backquoted argument"));
        }
        let Some(arg_end) = self.rest.find('`') else {
            return Err(format!("{name}'s argument has no closing backquote"));
        };
        let arg = self.rest[..arg_end].to_owned();
        self.rest = &self.rest[arg_end + 1..];
        if !self.eat(")") {
            return Err(format!("{name} takes one argument here"));
        }
        match name.as_str() {
            "Host" => Ok(Rule::Host(arg)),
            "Path" => Ok(Rule::Path(arg)),
            "PathPrefix" => Ok(Rule::PathPrefix(arg)),
            "PathRegexp" => regex::Regex::new(&arg)
                .map(Rule::PathRegexp)
                .map_err(|e| format!("PathRegexp: {e}")),
            other => Err(format!(
                "the matcher {other} (only Host, Path, PathPrefix and PathRegexp are translated)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "pattern", rename_all = "lowercase")]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

impl PathMatch {
    /// The matcher as one regular expression. Both webservers get regexes only, tried in the
    /// order written (Traefik's), so that what wins in Traefik wins there: nginx would otherwise
    /// prefer any prefix location to every regex, and Caddy's `path` ignores case.
    fn regex(&self) -> String {
        match self {
            PathMatch::Exact(p) => format!("^{}$", regex::escape(p)),
            PathMatch::Prefix(p) => format!("^{}", regex::escape(p)),
            PathMatch::Regex(re) => re.clone(),
        }
    }

    fn nginx(&self) -> String {
        format!("~ {}", nginx_word(&self.regex()))
    }

    fn caddy(&self) -> String {
        format!("path_regexp {}", caddy_word(&self.regex()))
    }
}

/// nginx needs quotes around arguments with spaces, `;`, `{`, `}` or quotes (regexes often
/// have braces); inside them it reads `\\` and `\"` as escapes and keeps other backslashes.
fn nginx_word(s: &str) -> String {
    if s.chars()
        .any(|c| c.is_whitespace() || matches!(c, ';' | '{' | '}' | '"' | '\'' | '$' | '\\'))
    {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s.to_owned()
    }
}

/// Caddy reads a backquoted token verbatim (no escapes at all), and Traefik's arguments cannot
/// hold a backquote.
fn caddy_word(s: &str) -> String {
    if s.chars()
        .any(|c| c.is_whitespace() || matches!(c, '{' | '}' | '"' | '#' | '\\' | '`'))
    {
        format!("`{s}`")
    } else {
        s.to_owned()
    }
}

#[derive(Debug, Clone, Serialize)]
struct Location {
    /// The router this location comes from.
    route: String,
    nginx: String,
    caddy: String,
    upstream: String,
    /// The metrics router: the path is replaced by the metrics path, behind basic auth if set.
    metrics: bool,
}

/// One host and port, with the routers of every side that serves it.
#[derive(Debug, Clone, Serialize)]
struct Server {
    /// `client API`, `federation API`, or both.
    kinds: Vec<&'static str>,
    host: String,
    port: u16,
    locations: Vec<Location>,
    /// Where every other path goes: the homeserver's client side (its federation side on a
    /// federation-only server), or nothing (404) on a host that only serves metrics.
    fallback: Option<String>,
    /// On a server that is both, where `/_matrix/federation/` and `/_matrix/key/` go.
    federation_fallback: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Upstream {
    name: String,
    /// `host:port`.
    address: String,
    /// `http` or `https`.
    scheme: &'static str,
}

/// What the nginx and Caddy templates render.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Webserver {
    upstreams: Vec<Upstream>,
    servers: Vec<Server>,
    /// Routers nothing here can express, as comment lines.
    skipped: Vec<String>,
    /// Addresses to listen on; empty: every address.
    bind_addresses: Vec<String>,
    tls_certificate: String,
    tls_certificate_key: String,
    /// 0: no limit.
    max_body_bytes: u64,
    read_timeout_seconds: u32,
    /// Whether the metrics router asks for basic auth.
    basic_auth: bool,
    /// `user:hash` lines for the metrics route (nginx's `auth_basic_user_file`).
    basic_auth_users: Vec<String>,
    /// Where nginx reads that file: beside the copied config when the role copies it.
    htpasswd_path: String,
    /// `user base64(bcrypt hash)` for Caddy's `basicauth`, which only takes bcrypt.
    caddy_basic_auth: Vec<String>,
}

/// Request headers that nginx and Caddy can both carry as given: a token for the name, and no
/// character either would read as syntax or a variable (`$`, `{}`), no quotes, no controls.
fn header_is_plain(name: &str, value: &str) -> bool {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#%&'*+-.^_|~".contains(&b));
    token
        && value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && !b"\"$`{}\\;".contains(&b))
}

/// A host a `server_name` and a Caddy site address can both take.
fn host_is_plain(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
}

impl Webserver {
    /// Upstream names to `host:port`.
    pub(crate) fn addresses(&self) -> indexmap::IndexMap<String, String> {
        self.upstreams
            .iter()
            .map(|u| (u.name.clone(), u.address.clone()))
            .collect()
    }

    /// Upstream names to `http` or `https`.
    pub(crate) fn schemes(&self) -> indexmap::IndexMap<String, &'static str> {
        self.upstreams
            .iter()
            .map(|u| (u.name.clone(), u.scheme))
            .collect()
    }

    pub(crate) fn htpasswd(&self) -> Option<String> {
        self.basic_auth.then(|| {
            self.basic_auth_users
                .iter()
                .map(|u| format!("{u}\n"))
                .collect()
        })
    }

    pub(crate) fn from_vars(
        r: &mut Reader<'_>,
        table: &RouteTable,
        config: &config::Config,
    ) -> Webserver {
        let v = |suffix: &str| format!("{VAR}{suffix}");
        let identifier = r.string("matrix_media_repo_identifier").unwrap_or_default();
        let htpasswd_dir = match r.string(&v("nginx_config_dir")).unwrap_or_default() {
            dir if dir.is_empty() => format!(
                "{}/nginx",
                r.string("matrix_media_repo_base_path").unwrap_or_default()
            ),
            dir => dir,
        };
        let mut web = Webserver {
            htpasswd_path: format!("{htpasswd_dir}/{identifier}.htpasswd"),
            bind_addresses: r.strings(&v("bind_addresses")).unwrap_or_default(),
            tls_certificate: r.string(&v("tls_certificate")).unwrap_or_default(),
            tls_certificate_key: r.string(&v("tls_certificate_key")).unwrap_or_default(),
            max_body_bytes: config.uploads.max_bytes,
            read_timeout_seconds: config
                .timeouts
                .federation_timeout_seconds
                .max(config.timeouts.client_server_timeout_seconds)
                + 60,
            ..Webserver::default()
        };
        let service_url = |name: &str| {
            table
                .services
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.url.clone())
                .unwrap_or_default()
        };
        let homeserver = format!("{SERVICE}-homeserver");
        let homeserver_federation = format!("{SERVICE}-homeserver-federation");
        let mut upstreams = Vec::new();
        for (name, variable, url) in [
            (
                SERVICE.to_owned(),
                "matrix_media_repo_traefik_service_url".to_owned(),
                service_url(SERVICE),
            ),
            (
                METRICS_SERVICE.to_owned(),
                "matrix_media_repo_traefik_metrics_service_url".to_owned(),
                service_url(METRICS_SERVICE),
            ),
            (
                homeserver.clone(),
                v("homeserver_client_url"),
                r.string(&v("homeserver_client_url")).unwrap_or_default(),
            ),
            (
                homeserver_federation.clone(),
                v("homeserver_federation_url"),
                r.string(&v("homeserver_federation_url"))
                    .unwrap_or_default(),
            ),
        ] {
            match upstream_address(&url) {
                Some((scheme, address)) => upstreams.push(Upstream {
                    name,
                    address,
                    scheme,
                }),
                None => {
                    let e = r.eval.invalid(
                        &variable,
                        &format!(
                            "is not an http:// or https:// URL with a host (`{url}`): the nginx and \
                             Caddy outputs proxy to it"
                        ),
                    );
                    r.diagnostics.errors.push(e);
                }
            }
        }
        let client_port = r.int(&v("client_port")).unwrap_or(443);
        let federation_port = r.int(&v("federation_port")).unwrap_or(8448);
        let mut port = |name: &str, value: i64| match u16::try_from(value) {
            Ok(p) if p > 0 => p,
            _ => {
                let e = r.eval.invalid(&v(name), "is not a port number (1-65535)");
                r.diagnostics.errors.push(e);
                0
            }
        };
        let client_port = port("client_port", client_port);
        let federation_port = port("federation_port", federation_port);

        for (name, value) in &table.request_headers {
            if !header_is_plain(name, value) {
                let e = r.eval.invalid(
                    "matrix_media_repo_container_labels_traefik_additional_request_headers",
                    &format!(
                        "has a header nginx and Caddy cannot carry as given (`{name}: {value}`): \
                         names are HTTP tokens, values printable without quotes, `$`, `{{`, `}}`, \
                         `;` or backslashes"
                    ),
                );
                r.diagnostics.errors.push(e);
            }
        }
        if let Some(users) = &table.metrics_basic_auth_users {
            web.basic_auth = true;
            for user in users.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                web.basic_auth_users.push(user.to_owned());
                if let Some((name, hash)) = user.split_once(':')
                    && hash.starts_with("$2")
                {
                    let hash = base64::engine::general_purpose::STANDARD.encode(hash);
                    web.caddy_basic_auth.push(format!("{name} {hash}"));
                }
            }
            let users_var =
                "matrix_media_repo_container_labels_traefik_metrics_middleware_basic_auth_users";
            if web.basic_auth_users.is_empty() {
                let e = r.eval.invalid(
                    users_var,
                    "is empty while basic auth protects the metrics: add `user:hash` entries \
                     (`htpasswd -nbB USER PASSWORD`), or turn basic auth off",
                );
                r.diagnostics.errors.push(e);
            } else if web.caddy_basic_auth.len() < web.basic_auth_users.len() {
                r.diagnostics.warnings.push(crate::Warning(format!(
                    "{users_var}: Caddy checks only bcrypt hashes (`htpasswd -B`); users with other \
                     hashes cannot sign in through the Caddy output (it answers 403 when none can)"
                )));
            }
        }

        let mut routes: Vec<&Route> = table.routes.iter().collect();
        // Traefik's order: an explicit priority, else the longest rule first.
        routes.sort_by_key(|r| std::cmp::Reverse(traefik_priority(r)));
        for route in routes {
            let variable = format!("{}rule", route.variables);
            let (kind, port, fallback) = match route.side {
                Side::Public | Side::Metrics => ("client API", client_port, &homeserver),
                Side::Federation => ("federation API", federation_port, &homeserver_federation),
                Side::Internal => {
                    web.skipped.push(format!(
                        "{}: the playbook's internal Traefik entrypoint (for containers on its network) has no counterpart here",
                        route.name
                    ));
                    continue;
                }
            };
            let (host, paths) = match Rule::parse(&route.rule).and_then(|rule| rule.split()) {
                Ok((Some(host), paths)) if host_is_plain(&host) => (host, paths),
                Ok((Some(host), _)) => {
                    web.skip(r, &variable, route, &format!("the host `{host}`"));
                    continue;
                }
                Ok((None, _)) => {
                    web.skip(r, &variable, route, "no Host matcher");
                    continue;
                }
                Err(e) => {
                    web.skip(r, &variable, route, &e);
                    continue;
                }
            };
            let metrics = route.side == Side::Metrics;
            let server = match web
                .servers
                .iter()
                .position(|s| s.host.eq_ignore_ascii_case(&host) && s.port == port)
            {
                Some(i) => &mut web.servers[i],
                None => {
                    web.servers.push(Server {
                        kinds: Vec::new(),
                        host: host.clone(),
                        port,
                        locations: Vec::new(),
                        fallback: None,
                        federation_fallback: None,
                    });
                    web.servers.last_mut().expect("just pushed")
                }
            };
            if !metrics {
                if !server.kinds.contains(&kind) {
                    server.kinds.push(kind);
                }
                match (kind, &server.fallback) {
                    // The client side keeps `/`; federation paths get their own locations.
                    ("federation API", Some(existing)) if existing == &homeserver => {
                        server.federation_fallback = Some(homeserver_federation.clone());
                    }
                    ("client API", Some(existing)) if existing == &homeserver_federation => {
                        server.fallback = Some(homeserver.clone());
                        server.federation_fallback = Some(homeserver_federation.clone());
                    }
                    (_, Some(_)) => {}
                    (_, None) => server.fallback = Some(fallback.clone()),
                }
            }
            for path in paths {
                server.locations.push(Location {
                    route: route.name.clone(),
                    nginx: path.nginx(),
                    caddy: path.caddy(),
                    upstream: route.service.clone(),
                    metrics,
                });
            }
        }
        for server in &mut web.servers {
            if server.kinds.is_empty() {
                server.kinds.push("metrics");
            }
        }
        web.upstreams = upstreams
            .into_iter()
            .filter(|u| {
                web.servers.iter().any(|s| {
                    s.fallback.as_deref() == Some(u.name.as_str())
                        || s.federation_fallback.as_deref() == Some(u.name.as_str())
                        || s.locations.iter().any(|l| l.upstream == u.name)
                })
            })
            .collect();
        web
    }

    fn skip(&mut self, r: &mut Reader<'_>, variable: &str, route: &Route, why: &str) {
        self.skipped.push(format!(
            "{}: its rule cannot be expressed here ({why}); route `{}` by hand",
            route.name, route.rule
        ));
        r.diagnostics.warnings.push(crate::Warning(format!(
            "{variable}: the nginx and Caddy outputs leave router {} out: its rule cannot be expressed there ({why})",
            route.name
        )));
    }
}

/// `http://host:port/...` as (`http`, `host:port`); a URL without a host is refused.
fn upstream_address(url: &str) -> Option<(&'static str, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => "http",
        "https" => "https",
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    let plain = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
    plain.then(|| (scheme, authority.to_owned()))
}

fn traefik_priority(route: &Route) -> i64 {
    if route.priority > 0 {
        route.priority
    } else {
        i64::try_from(route.rule.len()).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(rule: &str) -> Result<(Option<String>, Vec<PathMatch>), String> {
        Rule::parse(rule).and_then(|r| r.split())
    }

    #[test]
    fn host_and_path_rules_split_into_a_host_and_locations() {
        assert_eq!(
            split("Host(`m.example.com`) && PathPrefix(`/_matrix/media/`)").unwrap(),
            (
                Some("m.example.com".into()),
                vec![PathMatch::Prefix("/_matrix/media/".into())]
            )
        );
        assert_eq!(
            split("PathRegexp(`^/a/(?P<v>v1)/b`) && Host(`h`)").unwrap(),
            (
                Some("h".into()),
                vec![PathMatch::Regex("^/a/(?P<v>v1)/b".into())]
            )
        );
        assert_eq!(
            split("Host(`h`) && (Path(`/x`) || PathPrefix(`/y/`))")
                .unwrap()
                .1,
            vec![
                PathMatch::Exact("/x".into()),
                PathMatch::Prefix("/y/".into())
            ]
        );
        assert_eq!(
            split("Host(`h`)").unwrap().1,
            vec![PathMatch::Prefix("/".into())]
        );
    }

    #[test]
    fn rules_beyond_a_host_and_paths_are_refused_with_the_reason() {
        for (rule, why) in [
            ("Host(`a`) && !PathPrefix(`/x`)", "negated"),
            ("Host(`a`) || Host(`b`)", "Host matcher inside ||"),
            ("Host(`a`) && Host(`b`)", "more than one Host"),
            ("PathPrefix(`/a`) && PathPrefix(`/b`)", "more than one path"),
            ("Header(`X`, `y`)", "takes one argument"),
            ("HostRegexp(`.*`)", "HostRegexp"),
            ("Host(`a`", "takes one argument"),
            ("Host(`a`) junk", "unexpected"),
            ("PathRegexp(`(`)", "PathRegexp"),
        ] {
            let e = split(rule).unwrap_err();
            assert!(e.contains(why), "{rule}: {e}");
        }
    }

    #[test]
    fn every_matcher_becomes_a_regex_in_each_servers_syntax() {
        let p = PathMatch::Prefix("/_matrix/media/".into());
        assert_eq!(p.nginx(), "~ ^/_matrix/media/");
        assert_eq!(p.caddy(), "path_regexp ^/_matrix/media/");
        let dotted = PathMatch::Prefix("/_matrix/client/unstable/io.t2bot.media".into());
        assert_eq!(
            dotted.nginx(),
            "~ \"^/_matrix/client/unstable/io\\\\.t2bot\\\\.media\""
        );
        assert_eq!(
            dotted.caddy(),
            "path_regexp `^/_matrix/client/unstable/io\\.t2bot\\.media`"
        );
        let re = PathMatch::Regex("^/_matrix/client/(?P<version>(v1))/media/".into());
        assert_eq!(re.nginx(), "~ ^/_matrix/client/(?P<version>(v1))/media/");
        assert_eq!(
            re.caddy(),
            "path_regexp ^/_matrix/client/(?P<version>(v1))/media/"
        );
        let braces = PathMatch::Regex("^/a{2}\\d$".into());
        assert_eq!(braces.nginx(), "~ \"^/a{2}\\\\d$\"");
        assert_eq!(braces.caddy(), "path_regexp `^/a{2}\\d$`");
        assert_eq!(PathMatch::Exact("/m".into()).nginx(), "~ \"^/m$\"");
    }

    #[test]
    fn what_the_templates_would_carry_verbatim_is_checked() {
        assert!(header_is_plain("X-Forwarded-Host", "example.com"));
        for (name, value) in [
            ("X Bad", "v"),
            ("X-Ok", "a$host"),
            ("X-Ok", "{placeholder}"),
            ("X-Ok", "line\r\nInjected: 1"),
            ("X-Ok", "quote\""),
            ("X-Ok", "semi;colon"),
        ] {
            assert!(!header_is_plain(name, value), "{name}: {value:?}");
        }
        assert!(host_is_plain("matrix.example.com"));
        assert!(!host_is_plain("matrix.example.com; evil"));
        assert_eq!(
            upstream_address("https://10.0.0.5:8448/x"),
            Some(("https", "10.0.0.5:8448".to_owned()))
        );
        assert_eq!(upstream_address("127.0.0.1:8000"), None);
        assert_eq!(upstream_address("http://"), None);
    }
}
