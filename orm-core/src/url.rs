//! Database URLs in the forms SQLAlchemy users write.
//!
//! `tokio_postgres::Config` can parse URLs too, but it answers every mistake
//! with "invalid connection string"; we parse ourselves so that an error
//! names the part that is wrong, then hand a finished `Config` to the driver.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address.
    Tcp(String),
    /// A directory holding the server's unix socket (`/var/run/postgresql`).
    Unix(PathBuf),
}

/// How TLS is negotiated, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS only if the server insists (this build never offers it).
    Allow,
    /// Use TLS if the server offers it; this build has no TLS, so plain.
    Prefer,
    /// TLS is required: refused by this build, which links no TLS library.
    Require,
}

/// A parsed database URL. Its `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    /// `postgresql` or `postgres`.
    pub scheme: String,
    /// The SQLAlchemy driver suffix (`psycopg2` in `postgresql+psycopg2://`), if any.
    pub driver: Option<String>,
    /// The user name.
    pub user: Option<String>,
    password: Option<String>,
    /// The server's address.
    pub host: Option<Host>,
    /// The server's port.
    pub port: Option<u16>,
    /// The database name.
    pub database: Option<String>,
    /// `sslmode`.
    pub ssl_mode: SslMode,
    /// `application_name`, shown in `pg_stat_activity`.
    pub application_name: Option<String>,
    /// `connect_timeout`, in whole seconds in the URL.
    pub connect_timeout: Option<Duration>,
    /// `options`: command-line options sent to the server at startup (`-c key=value`).
    pub options: Option<String>,
}

const QUERY_OPTIONS: &str = "sslmode, application_name, connect_timeout, options, host, port, user, password, dbname";

impl DatabaseUrl {
    /// Parses `postgresql://user:password@host:port/database?option=value`.
    pub fn parse(url: &str) -> Result<Self> {
        let (scheme_text, rest) = url.split_once("://").ok_or_else(|| Error::InvalidUrl {
            part: "scheme".into(),
            reason: "expected a URL such as postgresql://user@host/database (no \"://\" found)".into(),
        })?;
        let (scheme, driver) = match scheme_text.split_once('+') {
            Some((scheme, driver)) => (scheme, Some(driver)),
            None => (scheme_text, None),
        };
        if scheme != "postgresql" && scheme != "postgres" {
            return Err(Error::UnsupportedScheme {
                scheme: scheme_text.to_owned(),
            });
        }
        if driver.is_some_and(|d| d.is_empty() || !d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
            return Err(Error::InvalidUrl {
                part: "scheme".into(),
                reason: format!("driver name in {scheme_text:?} must be letters, digits or _"),
            });
        }

        let (before_query, query) = match rest.split_once('?') {
            Some((before, query)) => (before, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.split_once('/') {
            Some((authority, path)) => (authority, Some(path)),
            None => (before_query, None),
        };
        // The password may itself contain '@' when not encoded; the last '@' ends the user info.
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        // "user:pa/ss@host" splits at the '/' before the '@' is seen, which
        // would read "user" as the host and part of the password as its
        // port: refuse it, without showing any of it.
        let at_after_host = path.is_some_and(|p| p.contains('@')) || query.is_some_and(|q| q.contains('@'));
        if userinfo.is_none() && authority.contains(':') && at_after_host {
            return Err(Error::InvalidUrl {
                part: "user info".into(),
                reason: "an '@' follows the host and port; percent-encode '/', '?' and '@' in a password \
                         (%2F, %3F, %40), and '@' in an option's value (%40)"
                    .into(),
            });
        }

        let mut parsed = DatabaseUrl {
            scheme: scheme.to_owned(),
            driver: driver.map(str::to_owned),
            user: None,
            password: None,
            host: None,
            port: None,
            database: None,
            ssl_mode: SslMode::Prefer,
            application_name: None,
            connect_timeout: None,
            options: None,
        };

        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                parsed.user = Some(percent_decode(user, "user")?);
            }
            if let Some(password) = password {
                // Never echo the password back, even in an error.
                parsed.password = Some(percent_decode(password, "password").map_err(|_| Error::InvalidUrl {
                    part: "password".into(),
                    reason: "contains an invalid percent-encoding (the value is not shown)".into(),
                })?);
            }
        }

        parse_host_port(hostport, &mut parsed)?;

        if let Some(path) = path {
            if !path.is_empty() {
                parsed.database = Some(percent_decode(path, "database")?);
            }
        }

        if let Some(query) = query {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').ok_or_else(|| Error::InvalidUrl {
                    part: format!("query option {pair:?}"),
                    reason: "expected key=value".into(),
                })?;
                let key = percent_decode(key, "query option name")?;
                let value = percent_decode(value, &format!("query option {key:?}"))?;
                // (percent_decode never quotes the text, so a password given
                // as an option does not leak through its error either.)
                parsed.apply_option(&key, value)?;
            }
        }
        Ok(parsed)
    }

    fn apply_option(&mut self, key: &str, value: String) -> Result<()> {
        let bad = |reason: &str| Error::InvalidUrl {
            part: format!("query option {key:?}"),
            reason: reason.to_owned(),
        };
        match key {
            "sslmode" => {
                self.ssl_mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" => SslMode::Allow,
                    "prefer" => SslMode::Prefer,
                    "require" | "verify-ca" | "verify-full" => SslMode::Require,
                    other => {
                        return Err(bad(&format!(
                            "{other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        )))
                    }
                }
            }
            "application_name" => self.application_name = Some(value),
            "connect_timeout" => {
                let seconds: u64 = value
                    .parse()
                    .map_err(|_| bad(&format!("{value:?} is not a whole number of seconds")))?;
                self.connect_timeout = (seconds > 0).then(|| Duration::from_secs(seconds));
            }
            "options" => self.options = Some(value),
            "host" => {
                self.host = Some(if value.starts_with('/') {
                    Host::Unix(PathBuf::from(value))
                } else {
                    Host::Tcp(value)
                })
            }
            "port" => self.port = Some(parse_port(&value, &format!("query option {key:?}"))?),
            "user" => self.user = Some(value),
            "password" => self.password = Some(value),
            "dbname" => self.database = Some(value),
            _ => return Err(bad(&format!("unknown option; supported options are {QUERY_OPTIONS}"))),
        }
        Ok(())
    }

    /// True when the URL carries a password.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The same URL pointing at another database (used to create test databases).
    pub fn with_database(&self, database: &str) -> Self {
        let mut url = self.clone();
        url.database = Some(database.to_owned());
        url
    }

    /// The URL as text *with* its password, for handing to another engine.
    /// Never log it; `Display` is the masked form.
    pub fn unmasked(&self) -> String {
        let mut out = String::new();
        let _ = self.render(&mut out, false);
        out
    }

    /// Writes the URL, every part percent-encoded, the password masked or not.
    fn render(&self, out: &mut impl fmt::Write, mask: bool) -> fmt::Result {
        out.write_str(&self.scheme)?;
        if let Some(driver) = &self.driver {
            write!(out, "+{driver}")?;
        }
        out.write_str("://")?;
        if self.user.is_some() || self.password.is_some() {
            out.write_str(&percent_encode(self.user.as_deref().unwrap_or("")))?;
            if let Some(password) = &self.password {
                out.write_char(':')?;
                out.write_str(&if mask {
                    "***".to_owned()
                } else {
                    percent_encode(password)
                })?;
            }
            out.write_char('@')?;
        }
        match &self.host {
            Some(Host::Tcp(host)) if host.contains(':') => write!(out, "[{host}]")?,
            Some(Host::Tcp(host)) => out.write_str(&percent_encode(host))?,
            Some(Host::Unix(dir)) => out.write_str(&percent_encode(&dir.to_string_lossy()))?,
            None => {}
        }
        if let Some(port) = self.port {
            write!(out, ":{port}")?;
        }
        if let Some(database) = &self.database {
            write!(out, "/{}", percent_encode(database))?;
        }
        let mut options: Vec<(&str, String)> = Vec::new();
        match self.ssl_mode {
            SslMode::Prefer => {}
            SslMode::Disable => options.push(("sslmode", "disable".into())),
            SslMode::Allow => options.push(("sslmode", "allow".into())),
            SslMode::Require => options.push(("sslmode", "require".into())),
        }
        if let Some(name) = &self.application_name {
            options.push(("application_name", name.clone()));
        }
        if let Some(timeout) = self.connect_timeout {
            options.push(("connect_timeout", timeout.as_secs().to_string()));
        }
        if let Some(server_options) = &self.options {
            options.push(("options", server_options.clone()));
        }
        for (i, (key, value)) in options.iter().enumerate() {
            write!(out, "{}{key}={}", if i == 0 { '?' } else { '&' }, percent_encode(value))?;
        }
        Ok(())
    }

    /// Builds the driver's configuration from this URL.
    pub fn to_config(&self) -> Result<tokio_postgres::Config> {
        let mut config = tokio_postgres::Config::new();
        if let Some(user) = &self.user {
            config.user(user);
        } else {
            // libpq's default: the operating system user.
            config.user(std::env::var("USER").unwrap_or_else(|_| "postgres".to_owned()));
        }
        if let Some(password) = &self.password {
            config.password(password);
        }
        match &self.host {
            Some(Host::Tcp(host)) => {
                config.host(host);
            }
            Some(Host::Unix(dir)) => {
                config.host_path(dir);
            }
            None => {
                config.host("localhost");
            }
        }
        config.port(self.port.unwrap_or(5432));
        if let Some(database) = &self.database {
            config.dbname(database);
        }
        if let Some(name) = &self.application_name {
            config.application_name(name);
        }
        if let Some(timeout) = self.connect_timeout {
            config.connect_timeout(timeout);
        }
        if let Some(options) = &self.options {
            config.options(options);
        }
        config.ssl_mode(match self.ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require => {
                return Err(Error::InvalidUrl {
                    part: "query option \"sslmode\"".into(),
                    reason: "TLS was required, but this build of orm links no TLS library; \
                             use sslmode=disable or sslmode=prefer"
                        .into(),
                })
            }
        });
        Ok(config)
    }
}

fn parse_host_port(hostport: &str, url: &mut DatabaseUrl) -> Result<()> {
    if hostport.is_empty() {
        return Ok(());
    }
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(|| Error::InvalidUrl {
            part: "host".into(),
            reason: format!("IPv6 address {hostport:?} lacks its closing ']'"),
        })?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| Error::InvalidUrl {
                part: "host".into(),
                reason: format!("unexpected {p:?} after the IPv6 address"),
            })?),
        };
        // A zone is written %25: "[fe80::1%25eth0]".
        (percent_decode(host, "host")?, port)
    } else {
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) => (percent_decode(host, "host")?, Some(port)),
            None => (percent_decode(hostport, "host")?, None),
        };
        if host.contains(':') && !host.starts_with('/') {
            return Err(Error::InvalidUrl {
                part: "host".into(),
                reason: "more than one ':' after the host; an IPv6 address goes in brackets, [::1]".into(),
            });
        }
        (host, port)
    };
    if host.contains(',') {
        return Err(Error::InvalidUrl {
            part: "host".into(),
            reason: "several hosts are not supported; name one".into(),
        });
    }
    if !host.is_empty() {
        url.host = Some(if host.starts_with('/') {
            Host::Unix(PathBuf::from(host))
        } else {
            Host::Tcp(host)
        });
    }
    if let Some(port) = port {
        url.port = Some(parse_port(port, "port")?);
    }
    Ok(())
}

/// A port number from 1 to 65535; `part` names where it was written.
fn parse_port(text: &str, part: &str) -> Result<u16> {
    text.parse().ok().filter(|p| *p != 0).ok_or_else(|| Error::InvalidUrl {
        part: part.to_owned(),
        reason: format!("{text:?} is not a port number between 1 and 65535"),
    })
}

fn percent_decode(text: &str, part: &str) -> Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Exactly two hex digits: from_str_radix alone would take "+1".
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::InvalidUrl {
                    part: part.to_owned(),
                    // The text is not quoted: it may be a password.
                    reason: format!("invalid percent-encoding at byte {i}"),
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::InvalidUrl {
        part: part.to_owned(),
        reason: "percent-decodes to invalid UTF-8".into(),
    })
}

impl fmt::Display for DatabaseUrl {
    /// Renders the URL with the password masked as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.render(f, true)
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("url", &self.to_string())
            .field("ssl_mode", &self.ssl_mode)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("options", &self.options)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_part() {
        let url = DatabaseUrl::parse(
            "postgresql+psycopg2://sandy:p%40ss%3Aword@db.example.com:6543/app%20db?sslmode=disable&application_name=web&connect_timeout=7&options=-c%20statement_timeout%3D5s",
        )
        .unwrap();
        assert_eq!(url.driver.as_deref(), Some("psycopg2"));
        assert_eq!(url.user.as_deref(), Some("sandy"));
        assert_eq!(url.password.as_deref(), Some("p@ss:word"));
        assert_eq!(url.host, Some(Host::Tcp("db.example.com".into())));
        assert_eq!(url.port, Some(6543));
        assert_eq!(url.database.as_deref(), Some("app db"));
        assert_eq!(url.ssl_mode, SslMode::Disable);
        assert_eq!(url.application_name.as_deref(), Some("web"));
        assert_eq!(url.connect_timeout, Some(Duration::from_secs(7)));
        assert_eq!(url.options.as_deref(), Some("-c statement_timeout=5s"));
    }

    #[test]
    fn unix_socket_hosts() {
        let url = DatabaseUrl::parse("postgres://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(url.host, Some(Host::Unix("/var/run/postgresql".into())));
        let url = DatabaseUrl::parse("postgres:///db?host=/tmp").unwrap();
        assert_eq!(url.host, Some(Host::Unix("/tmp".into())));
        assert_eq!(url.database.as_deref(), Some("db"));
    }

    #[test]
    fn ipv6_host() {
        let url = DatabaseUrl::parse("postgres://u@[::1]:5433/db").unwrap();
        assert_eq!(url.host, Some(Host::Tcp("::1".into())));
        assert_eq!(url.port, Some(5433));
    }

    fn part_of(result: Result<DatabaseUrl>) -> String {
        match result {
            Err(Error::InvalidUrl { part, .. }) => part,
            other => panic!("expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_part() {
        assert_eq!(part_of(DatabaseUrl::parse("localhost/db")), "scheme");
        assert_eq!(part_of(DatabaseUrl::parse("postgres://h:99999/db")), "port");
        assert_eq!(part_of(DatabaseUrl::parse("postgres://h:abc/db")), "port");
        assert_eq!(part_of(DatabaseUrl::parse("postgres://u:%zz@h/db")), "password");
        assert_eq!(part_of(DatabaseUrl::parse("postgres://h/db%4")), "database");
        assert_eq!(part_of(DatabaseUrl::parse("postgres://[::1/db")), "host");
        assert_eq!(
            part_of(DatabaseUrl::parse("postgres://h/db?connect_timeout=soon")),
            "query option \"connect_timeout\""
        );
        assert_eq!(
            part_of(DatabaseUrl::parse("postgres://h/db?sslmode=maybe")),
            "query option \"sslmode\""
        );
        assert_eq!(
            part_of(DatabaseUrl::parse("postgres://h/db?color=red")),
            "query option \"color\""
        );
        assert_eq!(
            part_of(DatabaseUrl::parse("postgres://h/db?flag")),
            "query option \"flag\""
        );
        assert!(matches!(
            DatabaseUrl::parse("mysql://h/db"),
            Err(Error::UnsupportedScheme { scheme }) if scheme == "mysql"
        ));
    }

    #[test]
    fn password_never_shows() {
        let url = DatabaseUrl::parse("postgres://sandy:hunter2@h/db").unwrap();
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(!url.to_string().contains("hunter2"));
        assert_eq!(url.to_string(), "postgres://sandy:***@h/db");
        assert!(url.unmasked().contains("hunter2"));
        let error = DatabaseUrl::parse("postgres://sandy:hunter2%@h/db").unwrap_err();
        assert!(!error.to_string().contains("hunter2"));
        // Given as an option, a badly encoded password does not show either.
        let error = DatabaseUrl::parse("postgres://sandy@h/db?password=hunter2%zz").unwrap_err();
        assert!(!format!("{error} {error:?}").contains("hunter2"), "{error}");
    }

    #[test]
    fn unencoded_slash_or_question_mark_in_a_password_is_refused_without_showing_it() {
        for url in [
            "postgresql://u:pa?ss@h/db",
            "postgresql://u:6543/x@h/db",
            "postgresql://u:se/cret@h:5432/db?sslmode=disable",
        ] {
            let error = DatabaseUrl::parse(url).unwrap_err();
            assert_eq!(part_of(DatabaseUrl::parse(url)), "user info", "{url}");
            let shown = format!("{error} {error:?}");
            for secret in ["pa", "ss", "6543", "se", "cret"] {
                assert!(!shown.contains(&format!("\"{secret}")), "{url}: {shown}");
            }
        }
        // Encoded, the same passwords parse.
        let url = DatabaseUrl::parse("postgresql://u:pa%3Fss@h/db").unwrap();
        assert!(url.unmasked().contains("u:pa%3Fss@h"), "{}", url.unmasked());
        // An '@' in an option's value is fine when no port could be mistaken.
        let url = DatabaseUrl::parse("postgresql://h/db?application_name=me@work").unwrap();
        assert_eq!(url.application_name.as_deref(), Some("me@work"));
    }

    #[test]
    fn malformed_hosts_and_escapes_are_refused() {
        assert_eq!(part_of(DatabaseUrl::parse("postgres://h/db%+1")), "database");
        assert_eq!(part_of(DatabaseUrl::parse("postgres://u:ab%+5@h/db")), "password");
        assert_eq!(part_of(DatabaseUrl::parse("postgres://::1/db")), "host");
        assert_eq!(part_of(DatabaseUrl::parse("postgres://h:5432:5433/db")), "host");
        let zoned = DatabaseUrl::parse("postgres://[fe80::1%25eth0]:5433/db").unwrap();
        assert_eq!(zoned.host, Some(Host::Tcp("fe80::1%eth0".into())));
        assert_eq!(zoned.port, Some(5433));
    }

    #[test]
    fn unmasked_round_trips_every_part() {
        let text = "postgresql+psycopg2://sa%20ndy:p%40ss%2Fw%3Ard@db.example.com:6543/app%20db?sslmode=disable&application_name=web%20app&connect_timeout=7&options=-c%20statement_timeout%3D5s";
        let url = DatabaseUrl::parse(text).unwrap();
        assert_eq!(DatabaseUrl::parse(&url.unmasked()).unwrap(), url);
        assert!(url.to_string().contains(":***@"));
        let socket = DatabaseUrl::parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(DatabaseUrl::parse(&socket.unmasked()).unwrap(), socket);
        let password_only = DatabaseUrl::parse("postgres://:secret@h/db").unwrap();
        assert_eq!(DatabaseUrl::parse(&password_only.unmasked()).unwrap(), password_only);
    }

    #[test]
    fn port_zero_is_refused_everywhere() {
        assert_eq!(part_of(DatabaseUrl::parse("postgres://h:0/db")), "port");
        assert_eq!(
            part_of(DatabaseUrl::parse("postgres://h/db?port=0")),
            "query option \"port\""
        );
    }

    #[test]
    fn required_tls_is_refused_clearly() {
        let url = DatabaseUrl::parse("postgres://h/db?sslmode=require").unwrap();
        let error = url.to_config().unwrap_err();
        assert!(error.to_string().contains("sslmode"), "{error}");
    }
}
