//! Errors as OpenAI reports them, so OpenAI client libraries raise the
//! exception their users expect (`BadRequestError`, `NotFoundError`, ...).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::backend::BackendError;

/// An error response: an HTTP status and an OpenAI error body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {}", body.message)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body's `error` object.
    pub body: ErrorBody,
}

/// The `error` object of an OpenAI error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub message: String,
    /// The class: `invalid_request_error` (the caller must change the
    /// request) or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A stable machine-readable code, e.g. `model_not_found`.
    pub code: Option<String>,
}

/// The whole JSON document, `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

const INVALID: &str = "invalid_request_error";
const SERVER: &str = "server_error";

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &str,
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                message: message.into(),
                kind: kind.into(),
                param: param.map(String::from),
                code: code.map(String::from),
            },
        }
    }

    /// 400: the request is malformed or a parameter is out of range.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID,
            message,
            param,
            Some("invalid_value"),
        )
    }

    /// 400 for a body that is not the JSON the endpoint expects.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID,
            message,
            None,
            Some("invalid_json"),
        )
    }

    /// 400 for a field this server understands but does not implement.
    pub fn unsupported(message: impl Into<String>, param: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID,
            message,
            Some(param),
            Some("unsupported_parameter"),
        )
    }

    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        Self::from(BackendError::UnknownModel(model.into()))
    }

    /// 400 `context_length_exceeded`.
    pub fn context_too_long(requested: usize, limit: usize, param: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID,
            format!(
                "This model's maximum context length is {limit} tokens. However, you requested \
                 {requested} tokens. Please reduce the length of the {param} or of the completion."
            ),
            Some(param),
            Some("context_length_exceeded"),
        )
    }

    /// 413: the body is over the server's limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID,
            format!("the request body is larger than the {limit}-byte limit"),
            None,
            Some("request_too_large"),
        )
    }

    /// 404 for a path no route serves.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID,
            format!("Invalid URL ({method} {path})"),
            None,
            Some("unknown_url"),
        )
    }

    /// 405 for a known path with the wrong method.
    pub fn wrong_method(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID,
            format!("{path} does not accept {method}"),
            None,
            Some("method_not_allowed"),
        )
    }

    /// 500: a bug or a broken model; the caller cannot fix it.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            SERVER,
            message,
            None,
            Some("internal_error"),
        )
    }

    /// The JSON document sent for this error (also inside SSE streams).
    pub fn envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope {
            error: self.body.clone(),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let message = e.to_string();
        match e {
            BackendError::UnknownModel(_) => Self::new(
                StatusCode::NOT_FOUND,
                INVALID,
                message,
                Some("model"),
                Some("model_not_found"),
            ),
            BackendError::BadRequest(_) => Self::new(
                StatusCode::BAD_REQUEST,
                INVALID,
                message,
                None,
                Some("invalid_value"),
            ),
            BackendError::ContextTooLong { requested, limit } => {
                Self::context_too_long(requested, limit, "messages")
            }
            BackendError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER,
                message,
                None,
                Some("service_unavailable"),
            ),
            BackendError::Internal(_) => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, "api: {}", self.body.message);
        } else {
            tracing::debug!(status = %self.status, "api: {}", self.body.message);
        }
        (self.status, Json(self.envelope())).into_response()
    }
}
