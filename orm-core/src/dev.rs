//! A PostgreSQL server for examples and tests, with no configuration.
//!
//! [`DevServer::start`] uses, in order: `DATABASE_URL`; the local default
//! server (`postgresql://postgres@127.0.0.1:5432/postgres`); a throwaway
//! cluster made with the machine's `initdb` and `pg_ctl`, removed when the
//! `DevServer` is dropped (or, should the process die first, by a watchdog
//! that notices). [`TestDatabase`] then gives each test a fresh database.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::url::DatabaseUrl;

/// The server tried when `DATABASE_URL` is not set.
pub const LOCAL_DEFAULT_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";

/// A reachable server: its URL, and the throwaway cluster if one was started.
#[derive(Debug)]
pub struct DevServer {
    url: String,
    cluster: Option<Cluster>,
}

impl DevServer {
    /// Finds or starts a server; see the module documentation for the order.
    pub async fn start() -> Result<DevServer> {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            if !url.trim().is_empty() {
                return Ok(DevServer { url, cluster: None });
            }
        }
        if reachable(LOCAL_DEFAULT_URL).await {
            return Ok(DevServer {
                url: LOCAL_DEFAULT_URL.to_owned(),
                cluster: None,
            });
        }
        let cluster = tokio::task::spawn_blocking(Cluster::start)
            .await
            .map_err(|e| Error::DevServer(format!("starting the throwaway cluster panicked: {e}")))??;
        Ok(DevServer {
            url: cluster.url(),
            cluster: Some(cluster),
        })
    }

    /// The server's URL (a maintenance database such as `postgres`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True when this process started the server and will remove it.
    pub fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }
}

async fn reachable(url: &str) -> bool {
    let Ok(engine) = Engine::builder(url).connect_timeout(Duration::from_secs(2)).build() else {
        return false;
    };
    match engine.connect().await {
        Ok(conn) => conn.raw_batch("SELECT 1").await.is_ok(),
        Err(_) => false,
    }
}

/// A PostgreSQL cluster in a temporary directory.
#[derive(Debug)]
struct Cluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    run_as_postgres: bool,
}

impl Cluster {
    fn start() -> Result<Cluster> {
        let bin = find_postgres_bin()?;
        let run_as_postgres = is_root();
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("orm-pg-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::DevServer(format!("cannot create {}: {e}", dir.display())))?;
        let port = free_port()?;
        let cluster = Cluster {
            dir,
            port,
            bin,
            run_as_postgres,
        };
        if run_as_postgres {
            // initdb refuses to run as root; the cluster belongs to `postgres`.
            run(Command::new("chown").arg("postgres").arg(&cluster.dir), "chown")?;
        }
        let data = cluster.dir.join("data");
        cluster.run_tool(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        let server_options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            path_str(&cluster.dir)?
        );
        let log = cluster.dir.join("server.log");
        cluster.run_tool(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-o",
                &server_options,
                "-l",
                path_str(&log)?,
                "-w",
                "start",
            ],
        )?;
        cluster.spawn_watchdog()?;
        Ok(cluster)
    }

    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if self.run_as_postgres {
            let mut command = Command::new("runuser");
            command.arg("-u").arg("postgres").arg("--").arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn run_tool(&self, tool: &str, args: &[&str]) -> Result<()> {
        run(self.command(tool).args(args), tool)
    }

    /// Stops the cluster and removes its directory once this process is gone,
    /// even if it never reaches `Drop` (tests keep their server in a static).
    fn spawn_watchdog(&self) -> Result<()> {
        let pg_ctl = self.bin.join("pg_ctl");
        let prefix = if self.run_as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {prefix}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = path_str(&pg_ctl)?,
            data = path_str(&self.dir.join("data"))?,
            dir = path_str(&self.dir)?,
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| Error::DevServer(format!("cannot start the cluster's watchdog: {e}")))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| Error::DevServer(format!("path {} is not UTF-8", path.display())))
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::DevServer(format!("cannot run {what}: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::DevServer(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

fn find_postgres_bin() -> Result<PathBuf> {
    find_postgres_bin_in(std::env::var_os("PATH"), Path::new("/usr/lib/postgresql"))
}

fn find_postgres_bin_in(path: Option<std::ffi::OsString>, debian_root: &Path) -> Result<PathBuf> {
    if let Some(path) = path {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(dir);
            }
        }
    }
    // Debian and Ubuntu keep the server binaries out of PATH, one directory per version.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(debian_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        Error::DevServer(
            "no server answered at 127.0.0.1:5432, DATABASE_URL is not set, and PostgreSQL's initdb/pg_ctl \
             were not found. Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`) or set \
             DATABASE_URL=postgresql://user:password@host:port/database"
                .into(),
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| Error::DevServer(format!("cannot find a free port: {e}")))
}

/// A database created for one test (or one example run) and dropped with it.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    server_url: String,
    url: String,
}

impl TestDatabase {
    /// Creates an empty database with a unique name on `server`.
    pub async fn create(server: &DevServer) -> Result<TestDatabase> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let name = format!(
            "orm_test_{}_{}_{}",
            std::process::id(),
            stamp % 1_000_000_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let server_url = DatabaseUrl::parse(server.url())?;
        let admin = Engine::builder(server.url()).pool_size(1).build()?;
        let conn = admin.connect().await?;
        let mut create = String::from("CREATE DATABASE ");
        crate::sql::Dialect::quote_identifier(&crate::sql::PgDialect, &mut create, &name);
        conn.raw_batch(&create).await?;
        let url = server_url.with_database(&name);
        Ok(TestDatabase {
            name,
            server_url: server.url().to_owned(),
            url: url.unmasked(),
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL for the database, password included: pass it to `create_engine`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops the database, ending any session still connected to it.
    pub async fn drop_database(&self) -> Result<()> {
        drop_database(&self.server_url, &self.name).await
    }
}

async fn drop_database(server_url: &str, name: &str) -> Result<()> {
    let admin = Engine::builder(server_url).pool_size(1).build()?;
    let conn = admin.connect().await?;
    let mut statement = String::from("DROP DATABASE IF EXISTS ");
    crate::sql::Dialect::quote_identifier(&crate::sql::PgDialect, &mut statement, name);
    statement.push_str(" WITH (FORCE)");
    conn.raw_batch(&statement).await
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on:
        // drop the database from a thread with a runtime of its own.
        let (server_url, name) = (self.server_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _ = runtime.block_on(drop_database(&server_url, &name));
            }
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_installation_says_what_to_install_or_set() {
        let empty = std::env::temp_dir().join(format!("orm-no-pg-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let error = find_postgres_bin_in(Some(empty.clone().into_os_string()), &empty).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("apt-get install postgresql"), "{message}");
        assert!(message.contains("DATABASE_URL"), "{message}");
        std::fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn the_newest_debian_version_is_preferred() {
        let root = std::env::temp_dir().join(format!("orm-fake-pg-{}", std::process::id()));
        for version in ["13", "15", "9"] {
            let bin = root.join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("initdb"), "").unwrap();
        }
        let found = find_postgres_bin_in(None, &root).unwrap();
        assert_eq!(found, root.join("15").join("bin"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
