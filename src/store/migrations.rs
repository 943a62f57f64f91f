//! The schema migrations of both backends, embedded from the repository's `sql/` folder so
//! the binary carries its own schema. Each backend's `migrate` records applied versions in
//! `schema_migrations` and runs each migration once, in a transaction with its record row
//! (or, for one marked `in_transaction: false`, statement by statement and then its row);
//! this module only lists the migrations and says which are still pending.

/// One schema change, applied once per database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Strictly increasing; the `NNNN` of the file name.
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
    /// False for a PostgreSQL migration that cannot run in a transaction (`CREATE INDEX
    /// CONCURRENTLY`): its statements run one by one, each on its own, so it must be
    /// written to be run again from the start after a failure halfway. Its statements are
    /// split at `;`, so its comments carry none.
    pub in_transaction: bool,
}

impl Migration {
    /// The migration's statements, one by one, without comment-only pieces.
    pub fn statements(&self) -> impl Iterator<Item = &'static str> {
        self.sql.split(';').map(str::trim).filter(|piece| {
            piece
                .lines()
                .any(|line| !line.trim().is_empty() && !line.trim_start().starts_with("--"))
        })
    }
}

/// The PostgreSQL migrations (`sql/postgres/`), in the order they apply.
pub static POSTGRES_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../sql/postgres/0001_init.sql"),
        in_transaction: true,
    },
    Migration {
        version: 2,
        name: "replicas",
        sql: include_str!("../../sql/postgres/0002_replicas.sql"),
        in_transaction: true,
    },
    Migration {
        version: 3,
        name: "ended_sessions",
        sql: include_str!("../../sql/postgres/0003_ended_sessions.sql"),
        in_transaction: true,
    },
    Migration {
        version: 4,
        name: "audit_action_index",
        sql: include_str!("../../sql/postgres/0004_audit_action_index.sql"),
        in_transaction: false,
    },
];

/// The SQLite migrations (`sql/sqlite/`), in the order they apply.
pub static SQLITE_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../sql/sqlite/0001_init.sql"),
        in_transaction: true,
    },
    Migration {
        version: 2,
        name: "replicas",
        sql: include_str!("../../sql/sqlite/0002_replicas.sql"),
        in_transaction: true,
    },
    Migration {
        version: 3,
        name: "ended_sessions",
        sql: include_str!("../../sql/sqlite/0003_ended_sessions.sql"),
        in_transaction: true,
    },
    Migration {
        version: 4,
        name: "audit_action_index",
        sql: include_str!("../../sql/sqlite/0004_audit_action_index.sql"),
        in_transaction: true,
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
    fn migrations_outside_a_transaction_split_into_their_statements() {
        for m in POSTGRES_MIGRATIONS.iter().chain(SQLITE_MIGRATIONS) {
            if m.in_transaction {
                continue;
            }
            assert!(
                m.sql
                    .lines()
                    .filter(|line| line.trim_start().starts_with("--"))
                    .all(|line| !line.contains(';')),
                "{}: a semicolon in a comment would split a statement",
                m.name
            );
        }
        let index = POSTGRES_MIGRATIONS
            .iter()
            .find(|m| m.version == 4)
            .expect("migration 4");
        let statements: Vec<_> = index.statements().collect();
        assert_eq!(statements.len(), 2, "{statements:?}");
        // The first piece carries the file's leading comments.
        assert!(statements[0].contains("\nDROP INDEX CONCURRENTLY IF EXISTS"));
        assert!(statements[1].starts_with("CREATE INDEX CONCURRENTLY"));
        assert!(
            SQLITE_MIGRATIONS.iter().all(|m| m.in_transaction),
            "SQLite runs every migration in a transaction"
        );
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
