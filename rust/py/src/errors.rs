//! The one place where core errors become Python exceptions.

use fastworker_core::CoreError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _core,
    FastworkerError,
    PyException,
    "Base class of fastworker's errors."
);
create_exception!(
    _core,
    ConfigurationError,
    FastworkerError,
    "Invalid worker or connection settings."
);
create_exception!(
    _core,
    DatabaseUnreachable,
    FastworkerError,
    "PostgreSQL could not be reached."
);
create_exception!(
    _core,
    SchemaMissing,
    FastworkerError,
    "The procrastinate schema is not in the database."
);
create_exception!(
    _core,
    ConnectionLost,
    FastworkerError,
    "The connection was lost and not regained in time."
);
create_exception!(_core, DatabaseError, FastworkerError, "A statement failed.");
create_exception!(
    _core,
    WorkerShutDown,
    FastworkerError,
    "The worker core was used after shutdown."
);

/// Wraps [`CoreError`] so the conversion can live in this crate (orphan rule).
pub struct BindingError(pub CoreError);

impl From<CoreError> for BindingError {
    fn from(error: CoreError) -> Self {
        BindingError(error)
    }
}

impl From<BindingError> for PyErr {
    fn from(BindingError(error): BindingError) -> PyErr {
        let message = error.to_string();
        match error {
            CoreError::Config(_) | CoreError::PoolerNotDeclared { .. } => {
                ConfigurationError::new_err(message)
            }
            CoreError::Unreachable { .. } => DatabaseUnreachable::new_err(message),
            CoreError::SchemaMissing { .. } => SchemaMissing::new_err(message),
            CoreError::ConnectionLost { .. } => ConnectionLost::new_err(message),
            CoreError::Database { .. } | CoreError::Unusable { .. } => {
                DatabaseError::new_err(message)
            }
            CoreError::ShutDown => WorkerShutDown::new_err(message),
            CoreError::Internal(_) => FastworkerError::new_err(message),
        }
    }
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add("FastworkerError", py.get_type::<FastworkerError>())?;
    module.add("ConfigurationError", py.get_type::<ConfigurationError>())?;
    module.add("DatabaseUnreachable", py.get_type::<DatabaseUnreachable>())?;
    module.add("SchemaMissing", py.get_type::<SchemaMissing>())?;
    module.add("ConnectionLost", py.get_type::<ConnectionLost>())?;
    module.add("DatabaseError", py.get_type::<DatabaseError>())?;
    module.add("WorkerShutDown", py.get_type::<WorkerShutDown>())?;
    Ok(())
}
