//! The gateway's own answers to `GET /v1/models` and `GET /v1/models/{id}`,
//! used when no catch-all backend can answer with the provider's list.

use serde::Serialize;

/// `owned_by` of the models the gateway lists: they are served through it.
const OWNER: &str = "ai-gateway";

#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

impl<'a> ModelObject<'a> {
    fn new(id: &'a str) -> Self {
        Self {
            id,
            object: "model",
            // The gateway has no creation date for a configured name; 0 keeps
            // the field (the SDKs require it) without inventing one.
            created: 0,
            owned_by: OWNER,
        }
    }
}

/// `{"object":"list","data":[...]}` for `models`.
pub fn list_json<'a>(models: impl Iterator<Item = &'a str>) -> Vec<u8> {
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<ModelObject<'a>>,
    }
    let list = List {
        object: "list",
        data: models.map(ModelObject::new).collect(),
    };
    serde_json::to_vec(&list).unwrap_or_default()
}

/// One model object, for `GET /v1/models/{id}`.
pub fn model_json(id: &str) -> Vec<u8> {
    serde_json::to_vec(&ModelObject::new(id)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&list_json(["a", "xai/grok-4.5"].into_iter())).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][1]["id"], "xai/grok-4.5");
        assert_eq!(v["data"][0]["object"], "model");
        let one: serde_json::Value = serde_json::from_slice(&model_json("a")).unwrap();
        assert_eq!(one["id"], "a");
    }
}
