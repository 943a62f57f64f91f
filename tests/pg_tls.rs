//! TLS to PostgreSQL, as `DATABASE_URL`'s `sslmode` asks: a private cluster of this test
//! serves a certificate of a CA made here. With `sslmode=verify-full` and that CA as
//! `sslrootcert`, the store works and every connection it opens (pooled ones and the fleet
//! listener's) is encrypted; checked against the platform's roots instead, which do not
//! hold that CA, the same server is refused; with no `sslmode` the store connects in the
//! clear, as it always did.

mod common;

use std::time::Duration;

use common::database::wait_for_listeners;
use common::private_postgres::PrivatePostgres;
use switchboard::store::postgres::PostgresStore;
use switchboard::store::Store;
use switchboard::tenants::ChangeFeed;
use tokio_util::sync::CancellationToken;

/// A CA, and a certificate it issued for 127.0.0.1 with its key, all PEM.
struct Certificates {
    ca: String,
    server: String,
    server_key: String,
}

fn certificates() -> anyhow::Result<Certificates> {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "switchboard test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate()?)?;
    let key = rcgen::KeyPair::generate()?;
    let server =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
    Ok(Certificates {
        ca: ca.pem(),
        server: server.pem(),
        server_key: key.serialize_pem(),
    })
}

/// Whether the server's backend `pid` talks TLS, asked over a connection of the test's own.
async fn encrypted(url: &str, pid: i32) -> anyhow::Result<bool> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", &[&pid])
        .await?;
    Ok(row.get(0))
}

/// The backend pid of one of `store`'s pooled connections.
async fn pooled_pid(store: &PostgresStore) -> anyhow::Result<i32> {
    let client = store.pool().get().await?;
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_verifies_the_server_and_encrypts_every_connection() -> anyhow::Result<()> {
    let certificates = certificates()?;
    let pg = PrivatePostgres::start_with(
        &[
            ("server.crt", &certificates.server),
            ("server.key", &certificates.server_key),
        ],
        &["ssl=on"],
    )?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &certificates.ca)?;

    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url,
        ca.display()
    );
    let store = PostgresStore::connect(&url, 2)?;
    store.migrate().await?;
    store.ping().await?;
    assert!(
        encrypted(&pg.url, pooled_pid(&store).await?).await?,
        "a pooled connection in the clear"
    );
    let shutdown = CancellationToken::new();
    let listening = store
        .listen_changes(ChangeFeed::new(16), shutdown.clone())
        .expect("PostgreSQL has a fleet listener");
    let listener = tokio::spawn(listening);
    let pids = wait_for_listeners(&pg.url, 1, Duration::from_secs(10)).await?;
    assert!(
        encrypted(&pg.url, pids[0]).await?,
        "the fleet listener in the clear"
    );
    shutdown.cancel();
    listener.await?;

    // The platform's roots do not hold the test's CA: the server is not trusted.
    let untrusted = PostgresStore::connect(&format!("{}?sslmode=require", pg.url), 1)?;
    let refused = untrusted.ping().await.expect_err("an untrusted server");
    assert!(
        refused.to_string().contains("certificate"),
        "not refused for its certificate: {refused}"
    );

    // No sslmode: in the clear, as before there was TLS.
    let plain = PostgresStore::connect(&pg.url, 1)?;
    plain.ping().await?;
    assert!(!encrypted(&pg.url, pooled_pid(&plain).await?).await?);
    Ok(())
}
