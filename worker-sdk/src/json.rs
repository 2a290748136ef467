//! Typed task payloads encoded as JSON with serde_json.

use serde::{Deserialize, Serialize};

use crate::{Error, Task, TaskContext};

/// The header that names the media type of a task's payload.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// The media type that [`Task::json`] sets and [`TaskContext::json`] expects.
pub const JSON_CONTENT_TYPE: &str = "application/json";

impl Task {
    /// Encodes `value` as JSON into the payload and sets the header
    /// `content-type: application/json`, replacing any earlier `content-type` header in
    /// any letter case.
    ///
    /// A worker reads the value back with [`TaskContext::json`]. Available with the
    /// `json` feature, which is on by default.
    ///
    /// ```
    /// use docket::Task;
    /// use serde::Serialize;
    ///
    /// #[derive(Serialize)]
    /// struct Email<'a> {
    ///     to: &'a str,
    ///     subject: &'a str,
    /// }
    ///
    /// let task = Task::new("emails", "send_email")
    ///     .priority(10)
    ///     .json(&Email {
    ///         to: "zoe@example.com",
    ///         subject: "Welcome",
    ///     })?;
    /// assert_eq!(
    ///     &task.as_proto().payload[..],
    ///     br#"{"to":"zoe@example.com","subject":"Welcome"}"#
    /// );
    /// assert_eq!(task.as_proto().headers["content-type"], "application/json");
    /// # Ok::<(), docket::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Returns [`Error::EncodeJson`] if serde_json cannot encode `value`, for example a
    /// map whose keys are not strings.
    pub fn json<T>(self, value: &T) -> Result<Self, Error>
    where
        T: Serialize + ?Sized,
    {
        let payload = serde_json::to_vec(value).map_err(|source| Error::EncodeJson {
            queue: self.queue_name().to_owned(),
            kind: self.kind_name().to_owned(),
            source,
        })?;

        let mut task = self.into_proto();
        task.headers
            .retain(|key, _| !key.eq_ignore_ascii_case(CONTENT_TYPE_HEADER));
        task.headers
            .insert(CONTENT_TYPE_HEADER.to_owned(), JSON_CONTENT_TYPE.to_owned());
        task.payload = payload.into();
        Ok(Task::from(task))
    }
}

impl TaskContext {
    /// Decodes the payload from JSON into a `T`.
    ///
    /// The task's `content-type` header, looked up in any letter case, must be
    /// `application/json` or another JSON media type such as
    /// `application/problem+json`, with or without parameters such as `charset=utf-8`.
    /// A task without the header is decoded too, so that producers that send raw JSON
    /// bytes without a header still work. [`TaskContext::payload`] returns the raw
    /// bytes of any payload.
    ///
    /// The errors convert into [`HandlerError`](crate::HandlerError) with `?`, so the
    /// attempt fails with a message that names the task id and the content type.
    ///
    /// ```
    /// use docket::{HandlerError, HandlerResult, TaskContext};
    /// use serde::Deserialize;
    ///
    /// #[derive(Deserialize)]
    /// struct Email {
    ///     to: String,
    /// }
    ///
    /// async fn send_email(task: TaskContext) -> HandlerResult {
    ///     let email: Email = task.json()?;
    ///     println!("sending to {}", email.to);
    ///     Ok(None)
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// Returns [`Error::UnexpectedContentType`] if the `content-type` header names a
    /// type other than JSON, and [`Error::DecodeJson`] if the payload is not valid JSON
    /// or does not match `T`.
    pub fn json<'de, T>(&'de self) -> Result<T, Error>
    where
        T: Deserialize<'de>,
    {
        let content_type = content_type(self);
        if let Some(content_type) = content_type
            && !is_json_media_type(content_type)
        {
            return Err(Error::UnexpectedContentType {
                task_id: self.id().to_owned(),
                content_type: content_type.to_owned(),
            });
        }

        serde_json::from_slice(self.payload()).map_err(|source| Error::DecodeJson {
            task_id: self.id().to_owned(),
            content_type: content_type.map(str::to_owned),
            source,
        })
    }
}

/// Returns the value of the task's `content-type` header, preferring the lowercase key
/// when several letter cases are set.
fn content_type(task: &TaskContext) -> Option<&str> {
    task.header(CONTENT_TYPE_HEADER).or_else(|| {
        task.headers()
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(CONTENT_TYPE_HEADER))
            .map(|(_, value)| value.as_str())
    })
}

/// Returns `true` for `application/json` and for `application/*+json` (RFC 6839
/// structured syntax suffix), ignoring letter case and parameters after `;`.
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.strip_prefix("application/") {
        Some(subtype) => subtype == "json" || subtype.ends_with("+json"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use docket_proto::v1::{Delivery, Task as WireTask};
    use serde::{Deserialize, Serialize};

    use super::*;

    const TASK_ID: &str = "0190a5f0-0000-7000-8000-000000000002";

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Invoice {
        customer: String,
        cents: u64,
        lines: Vec<String>,
    }

    fn invoice() -> Invoice {
        Invoice {
            customer: "Zoë & Co".to_owned(),
            cents: 12_345,
            lines: vec!["hosting".to_owned(), "support \"gold\"".to_owned()],
        }
    }

    /// Builds the context of a delivery of `task` as the broker would send it.
    fn delivered(task: Task) -> TaskContext {
        let task = task.into_proto();
        let delivery = Delivery {
            task: Some(WireTask {
                id: TASK_ID.to_owned(),
                queue: task.queue,
                kind: task.kind,
                payload: task.payload,
                headers: task.headers,
                max_attempts: 3,
                ..WireTask::default()
            }),
            lease_id: "lease-1".to_owned(),
            attempt: 1,
            lease_deadline: None,
        };
        TaskContext::from_delivery(delivery).expect("the delivery has a task")
    }

    fn raw(payload: &'static str, headers: &[(&str, &str)]) -> TaskContext {
        let headers: HashMap<String, String> = headers
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        delivered(
            Task::new("billing", "send_invoice")
                .payload(payload)
                .headers(headers),
        )
    }

    #[test]
    fn json_round_trip() {
        let task = Task::new("billing", "send_invoice")
            .json(&invoice())
            .unwrap();

        assert_eq!(
            task.as_proto()
                .headers
                .get(CONTENT_TYPE_HEADER)
                .map(String::as_str),
            Some(JSON_CONTENT_TYPE)
        );
        let decoded: Invoice = delivered(task).json().unwrap();
        assert_eq!(decoded, invoice());
    }

    #[test]
    fn json_keeps_other_fields_and_headers() {
        let task = Task::new("billing", "send_invoice")
            .header("Content-Type", "text/plain")
            .header("tenant", "acme")
            .priority(4)
            .max_attempts(9)
            .json(&invoice())
            .unwrap()
            .into_proto();

        assert_eq!(task.queue, "billing");
        assert_eq!(task.kind, "send_invoice");
        assert_eq!(task.priority, 4);
        assert_eq!(task.max_attempts, 9);
        assert_eq!(task.headers.len(), 2, "headers: {:?}", task.headers);
        assert_eq!(task.headers["tenant"], "acme");
        assert_eq!(task.headers[CONTENT_TYPE_HEADER], JSON_CONTENT_TYPE);
    }

    #[test]
    fn json_borrows_from_payload() {
        #[derive(Deserialize)]
        struct Borrowed<'a> {
            customer: &'a str,
        }
        let context = raw(r#"{"customer":"acme"}"#, &[]);

        let borrowed: Borrowed<'_> = context.json().unwrap();

        assert_eq!(borrowed.customer, "acme");
    }

    #[test]
    fn json_encode_failure_names_task() {
        let value = HashMap::from([((1, 2), "pair keys are not strings")]);

        let error = Task::new("billing", "send_invoice")
            .json(&value)
            .unwrap_err();

        assert!(matches!(error, Error::EncodeJson { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("\"send_invoice\""), "{message}");
        assert!(message.contains("\"billing\""), "{message}");
    }

    #[test]
    fn wrong_content_type_rejected() {
        let context = raw(r#"{"customer":"acme"}"#, &[("content-type", "text/csv")]);

        let error = context.json::<Invoice>().unwrap_err();

        let Error::UnexpectedContentType {
            task_id,
            content_type,
        } = &error
        else {
            panic!("expected UnexpectedContentType, got {error:?}");
        };
        assert_eq!(task_id, TASK_ID);
        assert_eq!(content_type, "text/csv");
        let message = error.to_string();
        assert!(message.contains(TASK_ID), "{message}");
        assert!(message.contains("\"text/csv\""), "{message}");
        assert!(message.contains("application/json"), "{message}");
    }

    #[test]
    fn invalid_json_rejected() {
        let context = raw("customer=acme", &[("content-type", "application/json")]);

        let error = context.json::<Invoice>().unwrap_err();

        let Error::DecodeJson {
            task_id,
            content_type,
            ..
        } = &error
        else {
            panic!("expected DecodeJson, got {error:?}");
        };
        assert_eq!(task_id, TASK_ID);
        assert_eq!(content_type.as_deref(), Some("application/json"));
        let message = crate::HandlerError::from(error).to_string();
        assert!(
            message.starts_with(&format!(
                "invalid JSON payload in task {TASK_ID} (content type \"application/json\"): "
            )),
            "{message}"
        );
        assert!(message.contains("line 1 column 1"), "{message}");
    }

    #[test]
    fn mismatched_json_rejected() {
        let context = raw(r#"{"customer":"acme"}"#, &[]);

        let error = context.json::<Invoice>().unwrap_err();

        assert!(
            matches!(
                &error,
                Error::DecodeJson {
                    content_type: None,
                    ..
                }
            ),
            "{error:?}"
        );
        let message = crate::HandlerError::from(error).to_string();
        assert!(message.contains("no content-type header"), "{message}");
        assert!(message.contains("missing field `cents`"), "{message}");
    }

    #[test]
    fn missing_content_type_decodes() {
        let context = raw(r#"{"customer":"acme","cents":5,"lines":[]}"#, &[]);

        let decoded: Invoice = context.json().unwrap();

        assert_eq!(decoded.cents, 5);
    }

    #[test]
    fn content_type_header_any_case() {
        let context = raw(
            r#"{"customer":"acme","cents":5,"lines":[]}"#,
            &[("Content-Type", "text/plain")],
        );

        let error = context.json::<Invoice>().unwrap_err();

        assert!(
            matches!(&error, Error::UnexpectedContentType { content_type, .. } if content_type == "text/plain"),
            "{error:?}"
        );
    }

    #[test]
    fn json_media_types_recognized() {
        for content_type in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/problem+json",
            "application/vnd.api+json",
        ] {
            assert!(
                is_json_media_type(content_type),
                "{content_type:?} is not recognized as JSON"
            );
        }
        for content_type in [
            "",
            "json",
            "text/json",
            "application/jsonl",
            "application/json-seq",
            "application/octet-stream",
            "text/plain; format=application/json",
        ] {
            assert!(
                !is_json_media_type(content_type),
                "{content_type:?} is recognized as JSON"
            );
        }
    }
}
