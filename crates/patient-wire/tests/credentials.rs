//! A user name and password in a request's URL never reach its JSON, its
//! URL, an error message or `Debug`; they are kept for the engine.

use patient_wire::{Request, RequestTemplate, RequestValidationError};
use serde_json::json;

#[track_caller]
fn assert_clean(text: &str) {
    assert!(!text.contains("s3cret"), "the password leaked: {text}");
    assert!(!text.contains("ada@"), "the user name leaked: {text}");
}

#[test]
fn built_requests_keep_credentials_out_of_the_url() {
    let request = Request::post("https://ada:s3cret@api.example.com/v1?x=1")
        .body("hi")
        .param("page", "2")
        .build()
        .unwrap();
    assert_eq!(
        request.url().as_str(),
        "https://api.example.com/v1?x=1&page=2"
    );
    let credentials = request.url_credentials().unwrap();
    assert_eq!(credentials.username(), "ada");
    assert_eq!(credentials.password(), Some("s3cret"));

    let wire = request.to_json();
    assert_eq!(wire["url"], "https://api.example.com/v1?x=1&page=2");
    assert_clean(&wire.to_string());
    assert_clean(&serde_json::to_string(&request).unwrap());
    assert_clean(&format!("{request:?}"));
    assert_clean(&format!("{request:#?}"));
    assert!(format!("{credentials:?}").contains("<redacted>"));
    assert!(!format!("{credentials:?}").contains("s3cret"));

    // Not carried through JSON: a loaded copy has none.
    let loaded = Request::from_json(&wire).unwrap();
    assert_eq!(loaded.url_credentials(), None);
    assert_ne!(loaded, request);

    // A derived request keeps them, with the same clean URL.
    let derived = request.to_builder().header("x-hop", "2").build().unwrap();
    assert_eq!(derived.url_credentials(), Some(credentials));
    assert_eq!(derived.url(), request.url());
    let builder = request.to_builder();
    assert_clean(&format!("{builder:?}"));
}

#[test]
fn loaded_requests_keep_credentials_out_of_the_url() {
    let wire = json!({
        "http_method": "get", "url": "http://ada:s3cret@127.0.0.1:8080/x",
        "headers": {}, "body": null, "timeout": null, "max_redirects": null
    });
    let request = Request::from_json(&wire).unwrap();
    assert_eq!(request.url().as_str(), "http://127.0.0.1:8080/x");
    assert_eq!(
        request
            .url_credentials()
            .map(|c| (c.username(), c.password())),
        Some(("ada", Some("s3cret")))
    );
    assert_clean(&request.to_json().to_string());
    assert_clean(&format!("{request:?}"));

    // Percent-encoded, user name only, password only.
    let request = Request::get("http://a%40b:p%2Fw%3A@h.example/")
        .build()
        .unwrap();
    let credentials = request.url_credentials().unwrap();
    assert_eq!(
        (credentials.username(), credentials.password()),
        ("a@b", Some("p/w:"))
    );
    let request = Request::get("http://token@h.example/").build().unwrap();
    assert_eq!(request.url().as_str(), "http://h.example/");
    assert_eq!(request.url_credentials().unwrap().password(), None);
    let request = Request::get("http://:token@h.example/").build().unwrap();
    assert_eq!(request.url_credentials().unwrap().username(), "");
    assert_eq!(
        Request::get("http://h.example/")
            .build()
            .unwrap()
            .url_credentials(),
        None
    );
    let error =
        Request::from_json(&json!({"http_method": "get", "url": "http://u:%FF@h/"})).unwrap_err();
    assert_eq!(error.path(), "url");
}

#[test]
fn errors_about_the_url_do_not_show_credentials() {
    let error = Request::get("http://ada:s3cret@h.example:99999/")
        .build()
        .unwrap_err();
    assert!(matches!(error, RequestValidationError::InvalidUrl { .. }));
    assert_clean(&error.to_string());
    assert!(error.to_string().contains("***@h.example:99999"), "{error}");
    let error = Request::from_json(&json!({"http_method": "get",
        "url": "http://ada:s3cret@h.example:99999/"}))
    .unwrap_err();
    assert_eq!(error.path(), "url");
    assert_clean(&error.to_string());
    assert_clean(&format!("{error:?}"));
}

#[test]
fn templates_keep_credentials_for_their_own_requests() {
    let api = RequestTemplate::new("https://ada:s3cret@api.example.com/v1")
        .unwrap()
        .header("accept", "application/json");
    assert_eq!(api.base_url().as_str(), "https://api.example.com/v1");
    assert_eq!(api.url_credentials().unwrap().username(), "ada");
    assert_clean(&format!("{api:?}"));
    assert_eq!(api.url_for("users"), "https://api.example.com/v1/users");

    let request = api.get("users/1").build().unwrap();
    assert_eq!(request.url().as_str(), "https://api.example.com/v1/users/1");
    assert_eq!(
        request.url_credentials().unwrap().password(),
        Some("s3cret")
    );
    assert_clean(&request.to_json().to_string());

    // An absolute URL is another request: the base URL's credentials stay
    // home, and its own win.
    let other = api.get("https://other.example/x").build().unwrap();
    assert_eq!(other.url_credentials(), None);
    let own = api.get("https://bob:pw@other.example/x").build().unwrap();
    assert_eq!(own.url_credentials().unwrap().username(), "bob");
    assert_eq!(own.url().as_str(), "https://other.example/x");
}
