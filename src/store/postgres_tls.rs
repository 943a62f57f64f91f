//! TLS to PostgreSQL, as `DATABASE_URL` asks for it with libpq's parameters:
//!
//! - `sslmode=require`, `verify-ca` or `verify-full`: TLS, and the server's certificate must
//!   chain to a trusted root and name the host connected to (all three verify fully:
//!   unlike libpq's `require`, which does not check the certificate, so that no setting
//!   here encrypts to whoever answers). The roots are the platform's, or only those in the
//!   PEM file `sslrootcert` names.
//! - `sslmode=prefer` (tokio-postgres' default when the URL says none) or `disable`: no TLS.
//!   (libpq's `prefer` would encrypt without checking the certificate.)
//!
//! tokio-postgres knows neither `sslrootcert` nor the two `verify-*` modes, and refuses a URL
//! that has them: they are taken out of the URL here before it parses the rest.

use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// `url` without the parameters tokio-postgres does not know (a `verify-*` mode becomes
/// `require`), and the `sslrootcert` path it named. Only those are touched: every other
/// byte of the URL is passed on as it was (tokio-postgres decodes it), and a connection
/// string that is no URL (`host=… user=…`) is returned as it is.
pub(super) fn split_url(url: &str) -> anyhow::Result<(String, Option<String>)> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_owned(), None));
    };
    let mut root_cert = None;
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslrootcert" => {
                let path = percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .context("DATABASE_URL: sslrootcert is not UTF-8")?;
                root_cert = Some(path.into_owned());
            }
            "sslmode" if matches!(value, "verify-ca" | "verify-full") => {
                kept.push("sslmode=require");
            }
            _ => kept.push(pair),
        }
    }
    if root_cert.as_deref() == Some("") {
        bail!("DATABASE_URL: sslrootcert is empty");
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, root_cert))
}

/// The TLS connector for `config`, which is set to use TLS exactly when its `sslmode`
/// requires it (`prefer` becomes `disable`). A connector that is never used (no TLS) has
/// no roots at all.
pub(super) fn connector(
    config: &mut tokio_postgres::Config,
    root_cert: Option<&str>,
) -> anyhow::Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let tls = match config.get_ssl_mode() {
        SslMode::Require => match root_cert {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("DATABASE_URL: reading sslrootcert {path}"))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    bail!("DATABASE_URL: sslrootcert {path} holds no certificate");
                }
                builder.with_root_certificates(roots)
            }
            None => {
                let verifier = rustls_platform_verifier::Verifier::new(provider)
                    .context("the platform's TLS roots")?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
            }
        },
        _ => {
            config.ssl_mode(SslMode::Disable);
            builder.with_root_certificates(rustls::RootCertStore::empty())
        }
    };
    let mut tls = tls.with_no_client_auth();
    // What PostgreSQL 17 expects of a client that names a protocol; older servers ignore it.
    tls.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_tokio_postgres_does_not_know_are_taken_out_of_the_url() {
        let (url, root) = split_url(
            "postgres://sb:pw@db.internal:5432/sb?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://sb:pw@db.internal:5432/sb?sslmode=require&application_name=x"
        );
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let parsed: tokio_postgres::Config = url.parse().unwrap();
        assert_eq!(parsed.get_ssl_mode(), SslMode::Require);

        let (url, root) = split_url("postgresql://sb@db/sb?sslrootcert=ca.pem").unwrap();
        assert_eq!(url, "postgresql://sb@db/sb");
        assert_eq!(root.as_deref(), Some("ca.pem"));
        // Everything else as it was: encoded spaces, several hosts, no query at all.
        for kept in [
            "postgres://u:p%40ss@db/sb?options=-c%20statement_timeout%3D5000&application_name=my%20app",
            "postgres://u@h1:5432,h2:5433/sb?target_session_attrs=read-write",
            "postgres://u@[fe80::1%25eth0]:5432/sb?sslmode=require",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/sb",
        ] {
            assert_eq!(split_url(kept).unwrap(), (kept.to_owned(), None));
        }
        let (url, _) =
            split_url("postgres://u@h1:5432,h2:5433/sb?sslmode=verify-ca&options=-c%20x%3Dy")
                .unwrap();
        assert_eq!(
            url,
            "postgres://u@h1:5432,h2:5433/sb?sslmode=require&options=-c%20x%3Dy"
        );
        // Not a URL: left to tokio-postgres as it is.
        let plain = "host=db user=sb sslmode=require";
        assert_eq!(split_url(plain).unwrap(), (plain.to_owned(), None));
        assert!(split_url("postgres://db/sb?sslrootcert=").is_err());
    }

    #[test]
    fn tls_is_used_only_when_the_mode_requires_it() {
        let mut prefer: tokio_postgres::Config = "postgres://sb@db/sb".parse().unwrap();
        connector(&mut prefer, None).unwrap();
        assert_eq!(prefer.get_ssl_mode(), SslMode::Disable);
        let mut require: tokio_postgres::Config =
            "postgres://sb@db/sb?sslmode=require".parse().unwrap();
        connector(&mut require, None).unwrap();
        assert_eq!(require.get_ssl_mode(), SslMode::Require);
        let Err(missing) = connector(&mut require, Some("/no/such/ca.pem")) else {
            panic!("a missing sslrootcert was taken");
        };
        assert!(
            format!("{missing:#}").contains("/no/such/ca.pem"),
            "{missing:#}"
        );
    }
}
