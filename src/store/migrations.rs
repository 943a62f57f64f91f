//! The schema migrations of both backends, embedded from the repository's `sql/` folder so
//! the binary carries its own schema. Each backend's `migrate` records applied versions in
//! `schema_migrations` and runs each migration once, in a transaction with its record row;
//! this module only lists the migrations and says which are still pending.

/// One schema change, applied once per database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Strictly increasing; the `NNNN` of the file name.
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The PostgreSQL migrations (`sql/postgres/`), in the order they apply.
pub static POSTGRES_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../sql/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "replicas",
        sql: include_str!("../../sql/postgres/0002_replicas.sql"),
    },
    Migration {
        version: 3,
        name: "ended_sessions",
        sql: include_str!("../../sql/postgres/0003_ended_sessions.sql"),
    },
    Migration {
        version: 4,
        name: "audit_action_index",
        sql: include_str!("../../sql/postgres/0004_audit_action_index.sql"),
    },
];

/// The SQLite migrations (`sql/sqlite/`), in the order they apply.
pub static SQLITE_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../sql/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "replicas",
        sql: include_str!("../../sql/sqlite/0002_replicas.sql"),
    },
    Migration {
        version: 3,
        name: "ended_sessions",
        sql: include_str!("../../sql/sqlite/0003_ended_sessions.sql"),
    },
    Migration {
        version: 4,
        name: "audit_action_index",
        sql: include_str!("../../sql/sqlite/0004_audit_action_index.sql"),
    },
];

/// The bookkeeping table, created before anything else; the same text suits both backends.
pub(super) const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";

/// The migrations of `all` whose versions are not in `applied`, in order.
pub(super) fn pending<'a>(
    all: &'a [Migration],
    applied: &'a [i64],
) -> impl Iterator<Item = &'a Migration> + 'a {
    all.iter().filter(move |m| !applied.contains(&m.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_backends_match() {
        for list in [POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS] {
            assert!(list.windows(2).all(|w| w[0].version < w[1].version));
            assert!(list.iter().all(|m| !m.sql.trim().is_empty()));
        }
        let pg: Vec<_> = POSTGRES_MIGRATIONS
            .iter()
            .map(|m| (m.version, m.name))
            .collect();
        let lite: Vec<_> = SQLITE_MIGRATIONS
            .iter()
            .map(|m| (m.version, m.name))
            .collect();
        assert_eq!(pg, lite, "both backends carry the same migrations");
    }

    #[test]
    fn pending_skips_applied_versions() {
        let versions: Vec<i64> = pending(POSTGRES_MIGRATIONS, &[1])
            .map(|m| m.version)
            .collect();
        assert!(!versions.contains(&1));
        assert_eq!(
            pending(POSTGRES_MIGRATIONS, &[]).count(),
            POSTGRES_MIGRATIONS.len()
        );
    }
}
