//! [`Db`]: one of the core's connections, and how its statements are sent, directly to
//! PostgreSQL or through a transaction pooler (PgBouncer `pool_mode = transaction`).
//!
//! Behind such a pooler, each transaction may run on another server connection, shared
//! with other clients. So, in pooler mode:
//! - no named prepared statements: a statement prepared in one transaction is gone (or
//!   someone else's) in the next. Every statement is sent unnamed (Parse, Bind, Execute,
//!   Sync in one message), its parameter types given by the casts of its own text
//!   ([`param_types`]);
//! - no session settings: a `SET` would stay on a server connection other clients get, and
//!   would be missing on the next one this client gets. The settings (generic plans, no
//!   JIT, no sequential scans, the lock timeout; see [`crate::connect`]) are `SET LOCAL` at
//!   the start of each transaction: a statement on its own is sent as `BEGIN; SET LOCAL
//!   ...`, the statement, `COMMIT`, pipelined (one round trip, as before).
//!
//! Directly connected, the statements the core sends all the time (the claim and the
//! completions) are named prepared statements, planned once per connection; the others
//! are sent unnamed (one round trip, where tokio-postgres' own `query(&str)` takes two).
//! A transaction pooler used without pooler mode shows as the server not knowing such a
//! statement, or already knowing another client's of the same name
//! ([`Db::transaction_pooler_sign`]).

use std::sync::OnceLock;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error, Row, Statement, Transaction};

/// A statement prepared on its connection (named), or its text and parameter types, sent
/// unnamed each time (pooler mode).
pub enum Prepared {
    Named(Statement),
    Unnamed { sql: &'static str, types: Vec<Type> },
}

/// Whether a statement runs in a transaction that is already open (the dispatcher's
/// pipelined `BEGIN` ... `COMMIT`) or is a transaction of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Within {
    OwnTransaction,
    OpenTransaction,
}

pub struct Db {
    client: Client,
    /// Pooler mode: `SET LOCAL ...` for each of the session's settings, sent at the start
    /// of each transaction. `None`: connected directly, the settings are the session's.
    local_settings: Option<String>,
    /// What showed a transaction pooler used without pooler mode (see
    /// [`Db::transaction_pooler_sign`]), once seen.
    pooler_sign: OnceLock<&'static str>,
}

/// The server did not know a statement this connection prepared (26000,
/// `invalid_sql_statement_name`): the transaction that prepared it ran on another server
/// connection.
const LOST_A_STATEMENT: &str =
    "lost a statement prepared on the worker's connection (\"prepared statement ... does not \
     exist\")";
/// The server already had a statement of the name this connection gave a new one (42P05,
/// `duplicate_prepared_statement`): another client's, prepared on the same server
/// connection (names are unique per client, and a pooler passes server connections on
/// without clearing them).
const KNEW_A_STATEMENT: &str =
    "already held a prepared statement of the name the worker gave its own (\"prepared \
     statement ... already exists\")";

impl Db {
    pub(crate) fn direct(client: Client) -> Db {
        Db {
            client,
            local_settings: None,
            pooler_sign: OnceLock::new(),
        }
    }

    /// `settings`: `(name, value)` of each setting, applied to each transaction.
    pub(crate) fn pooled(client: Client, settings: &[(&str, String)]) -> Db {
        let mut db = Db {
            client,
            local_settings: Some(String::new()),
            pooler_sign: OnceLock::new(),
        };
        for (name, value) in settings {
            db.push_local_setting(name, value);
        }
        db
    }

    fn push_local_setting(&mut self, name: &str, value: &str) {
        if let Some(settings) = &mut self.local_settings {
            settings.push_str(&format!("SET LOCAL {name} TO {value}; "));
        }
    }

    /// Through a transaction pooler (see the module's documentation).
    pub fn is_pooled(&self) -> bool {
        self.local_settings.is_some()
    }

    /// The connection itself, for tests that look at the session (plans, settings). The
    /// core's own statements go through the methods above.
    pub fn raw_client(&self) -> &Client {
        &self.client
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// What the server said that nothing on a session of its own says: it forgot a
    /// statement this connection prepared, or already had one of the name this connection
    /// chose. Each transaction of this connection runs on another server connection,
    /// shared with other clients, behind a transaction pooler (PgBouncer `pool_mode =
    /// transaction`) used without pooler mode. `None`: no such sign (yet).
    pub fn transaction_pooler_sign(&self) -> Option<&'static str> {
        self.pooler_sign.get().copied()
    }

    /// Remembers `error` if it is a sign of a transaction pooler (see above).
    fn note_pooler_sign(&self, error: &Error) {
        let sign = match error.code() {
            Some(code) if *code == SqlState::INVALID_SQL_STATEMENT_NAME => LOST_A_STATEMENT,
            Some(code) if *code == SqlState::DUPLICATE_PSTATEMENT => KNEW_A_STATEMENT,
            _ => return,
        };
        let _ = self.pooler_sign.set(sign);
    }

    /// One more setting of this connection: `SET` for the session, or, in pooler mode,
    /// `SET LOCAL` in each transaction. `name` and `value` are the core's own constants.
    pub async fn set(&mut self, name: &'static str, value: &'static str) -> Result<(), Error> {
        if self.is_pooled() {
            self.push_local_setting(name, value);
            Ok(())
        } else {
            self.client
                .batch_execute(&format!("SET {name} TO {value}"))
                .await
        }
    }

    /// The statement that opens a transaction (with its settings in pooler mode).
    pub fn begin_statement(&self) -> String {
        match &self.local_settings {
            Some(settings) => format!("BEGIN; {settings}"),
            None => "BEGIN".to_string(),
        }
    }

    /// Simple-protocol statements without parameters (`BEGIN`, `COMMIT`, `ROLLBACK`).
    pub async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
        self.client.batch_execute(sql).await
    }

    /// A statement sent often: prepared once (named) when connected directly.
    pub async fn prepare(&self, sql: &'static str) -> Result<Prepared, Error> {
        let types = param_types(sql);
        if self.is_pooled() {
            Ok(Prepared::Unnamed { sql, types })
        } else {
            let prepared = self.client.prepare_typed(sql, &types).await;
            if let Err(error) = &prepared {
                self.note_pooler_sign(error);
            }
            Ok(Prepared::Named(prepared?))
        }
    }

    pub async fn query_prepared(
        &self,
        statement: &Prepared,
        params: &[&(dyn ToSql + Sync)],
        within: Within,
    ) -> Result<Vec<Row>, Error> {
        let query = async {
            match statement {
                Prepared::Named(statement) => {
                    let answer = self.client.query(statement, params).await;
                    if let Err(error) = &answer {
                        self.note_pooler_sign(error);
                    }
                    answer
                }
                Prepared::Unnamed { sql, types } => {
                    self.client.query_typed(sql, &typed(params, types)).await
                }
            }
        };
        self.in_transaction(query, within).await
    }

    /// A statement of [`crate::sql`], sent unnamed, in a transaction of its own.
    pub async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let types = param_types(sql);
        let params = typed(params, &types);
        let query = self.client.query_typed(sql, &params);
        self.in_transaction(query, Within::OwnTransaction).await
    }

    /// [`Db::query`]'s one row; an error if there is none.
    pub async fn query_one(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        let types = param_types(sql);
        let params = typed(params, &types);
        let query = self.client.query_typed_one(sql, &params);
        self.in_transaction(query, Within::OwnTransaction).await
    }

    /// A transaction (its settings set, in pooler mode). Its statements go through
    /// [`query_in`] and [`execute_in`].
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        let settings = self.local_settings.clone();
        let transaction = self.client.transaction().await?;
        if let Some(settings) = settings {
            transaction.batch_execute(&settings).await?;
        }
        Ok(transaction)
    }

    /// In pooler mode, `query` in a transaction of its own with the settings:
    /// `BEGIN; SET LOCAL ...`, the statement, `COMMIT`, sent together (polled in order by
    /// `join!`, so sent in this order, in one round trip). A failed statement makes the
    /// server answer `COMMIT` with a rollback.
    async fn in_transaction<T>(
        &self,
        query: impl std::future::Future<Output = Result<T, Error>>,
        within: Within,
    ) -> Result<T, Error> {
        match (&self.local_settings, within) {
            (Some(settings), Within::OwnTransaction) => {
                let begin = format!("BEGIN; {settings}");
                let (begun, answer, committed) = tokio::join!(
                    self.client.batch_execute(&begin),
                    query,
                    self.client.batch_execute("COMMIT"),
                );
                begun?;
                let answer = answer?;
                committed?;
                Ok(answer)
            }
            _ => query.await,
        }
    }
}

/// A statement of [`crate::sql`] in an open transaction, sent unnamed.
pub async fn query_in(
    transaction: &Transaction<'_>,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, Error> {
    let types = param_types(sql);
    transaction.query_typed(sql, &typed(params, &types)).await
}

/// [`query_in`], for the number of rows.
pub async fn execute_in(
    transaction: &Transaction<'_>,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, Error> {
    let types = param_types(sql);
    transaction.execute_typed(sql, &typed(params, &types)).await
}

fn typed<'a>(
    params: &[&'a (dyn ToSql + Sync)],
    types: &[Type],
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .enumerate()
        .map(|(index, param)| {
            let param_type = types.get(index).cloned().unwrap_or(Type::UNKNOWN);
            (*param, param_type)
        })
        .collect()
}

/// The type of each parameter `$n` of a statement, from its first cast (`$1::bigint[]`):
/// every parameter of the core's statements is cast where it is used (the core's tests
/// check that these are the types PostgreSQL itself infers, for every statement). A
/// parameter without a cast, or with one not listed here, is `unknown`.
pub fn param_types(sql: &str) -> Vec<Type> {
    let bytes = sql.as_bytes();
    let mut types: Vec<Option<Type>> = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] != b'$' {
            index += 1;
            continue;
        }
        let digits_start = index + 1;
        let mut end = digits_start;
        while end < bytes.len() && bytes[end].is_ascii_digit() {
            end += 1;
        }
        index = end;
        let Ok(number) = sql[digits_start..end].parse::<usize>() else {
            continue;
        };
        if number == 0 {
            continue;
        }
        if types.len() < number {
            types.resize(number, None);
        }
        let Some(cast) = sql[end..].strip_prefix("::") else {
            continue;
        };
        let name_length = cast
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '[' || c == ']'))
            .unwrap_or(cast.len());
        let slot = &mut types[number - 1];
        if slot.is_none() {
            *slot = type_named(&cast[..name_length]);
        }
    }
    types
        .into_iter()
        .map(|found| found.unwrap_or(Type::UNKNOWN))
        .collect()
}

fn type_named(name: &str) -> Option<Type> {
    Some(match name {
        "bigint" | "int8" => Type::INT8,
        "bigint[]" | "int8[]" => Type::INT8_ARRAY,
        "int" | "integer" | "int4" => Type::INT4,
        "int[]" | "integer[]" | "int4[]" => Type::INT4_ARRAY,
        "text" => Type::TEXT,
        "text[]" => Type::TEXT_ARRAY,
        "varchar" => Type::VARCHAR,
        "varchar[]" => Type::VARCHAR_ARRAY,
        "float8" => Type::FLOAT8,
        "boolean" | "bool" => Type::BOOL,
        "timestamptz" => Type::TIMESTAMPTZ,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_types_come_from_their_first_cast() {
        assert_eq!(
            param_types("SELECT $2::int[], $1::bigint, $2::int[] || $3::text"),
            vec![Type::INT8, Type::INT4_ARRAY, Type::TEXT]
        );
        assert_eq!(param_types("SELECT 1"), Vec::<Type>::new());
        // No cast, or an unknown one: the server decides (and the core's tests fail).
        assert_eq!(
            param_types("SELECT $1, $2::point"),
            vec![Type::UNKNOWN, Type::UNKNOWN]
        );
    }

    #[test]
    fn every_statement_of_the_core_has_a_known_type_for_each_parameter() {
        for (name, statement, _) in crate::sql::STATEMENTS {
            let types = param_types(statement);
            assert!(!types.contains(&Type::UNKNOWN), "{name}: {types:?}");
        }
    }
}
