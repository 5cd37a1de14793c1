//! `Identity`: the `identity:` settings as the native listener takes them
//! (`native.identity_spec` builds the arguments from `IdentitySettings`), the
//! keys loaded once. `identify(head, peer, now)` answers as a connection
//! would, for tests and tools.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use loopwatch_dataplane_core::head::{parse_head, HeadLimits, HeadStatus};
use loopwatch_dataplane_core::identity::jwt::JwtSpec;
use loopwatch_dataplane_core::identity::{Identity as CoreIdentity, IdentitySpec};

/// Seconds since the Unix epoch, now.
pub fn wall_clock() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Client identity for the native listener. Bad settings are a ValueError
/// naming the setting.
#[pyclass(frozen, module = "loopwatch.proxy.dataplane._dataplane")]
pub struct Identity {
    pub inner: Arc<CoreIdentity>,
}

#[pymethods]
impl Identity {
    #[new]
    #[pyo3(signature = (
        *,
        sources,
        trusted_proxies = Vec::new(),
        bind_to_address = true,
        bind_verified = false,
        max_key_length = 256,
        query_params = vec!["token".to_owned(), "access_token".to_owned()],
        subprotocol = true,
        verify = false,
        algorithms = Vec::new(),
        secret = None,
        secret_refused = false,
        public_key_pem = None,
        audience = None,
        issuer = None,
        leeway = 30.0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        sources: Vec<String>,
        trusted_proxies: Vec<String>,
        bind_to_address: bool,
        bind_verified: bool,
        max_key_length: usize,
        query_params: Vec<String>,
        subprotocol: bool,
        verify: bool,
        algorithms: Vec<String>,
        secret: Option<Vec<u8>>,
        secret_refused: bool,
        public_key_pem: Option<Vec<u8>>,
        audience: Option<Vec<String>>,
        issuer: Option<String>,
        leeway: f64,
    ) -> PyResult<Identity> {
        let spec = IdentitySpec {
            sources,
            trusted_proxies,
            bind_to_address,
            bind_verified,
            max_key_length,
            jwt: JwtSpec {
                query_params,
                subprotocol,
                verify,
                algorithms,
                secret,
                secret_refused,
                public_key_pem,
                audience,
                issuer,
                leeway,
            },
        };
        let inner = py
            .detach(|| CoreIdentity::new(&spec))
            .map_err(PyValueError::new_err)?;
        Ok(Identity {
            inner: Arc::new(inner),
        })
    }

    /// (key, source, address, verified) for a complete request head from
    /// `peer` at `now` (seconds since the epoch; the wall clock when None).
    #[pyo3(signature = (head, peer, now = None))]
    fn identify(
        &self,
        head: &[u8],
        peer: &str,
        now: Option<f64>,
    ) -> PyResult<(String, String, String, bool)> {
        let peer: IpAddr = peer.parse().map_err(|_| {
            PyValueError::new_err(format!("peer: expected an IP address, got {peer:?}"))
        })?;
        let limits = HeadLimits {
            max_head_size: head.len().max(1),
        };
        let HeadStatus::Complete(parsed) = parse_head(head, &limits) else {
            return Err(PyValueError::new_err(
                "head: expected a complete, valid request head",
            ));
        };
        let client = self
            .inner
            .identify(&parsed, peer, now.unwrap_or_else(wall_clock));
        Ok((
            client.key,
            client.source,
            client.address_text,
            client.verified,
        ))
    }

    /// Whether JWT signatures are verified.
    #[getter]
    fn verifies(&self) -> bool {
        self.inner.verifies()
    }

    fn __repr__(&self) -> String {
        format!("Identity(verify={})", self.inner.verifies())
    }
}
