//! The built-in SigV4 signer against published vectors and a real server.
//!
//! * The AWS Signature Version 4 test suite (`aws-sig-v4-test-suite`, signed
//!   2015-08-30T12:36:00Z by `AKIDEXAMPLE` for region `us-east-1`, service
//!   `service`), and the revised copy the AWS Common Runtime keeps, which adds
//!   `-unnormalized` variants of the path cases and a few new cases, and
//!   revises the multi-line header and form cases. For each case: the
//!   canonical request, the string to sign and the `Authorization` header the
//!   suite expects.
//! * The examples of the S3 documentation ("Signature Calculations for the
//!   Authorization Header").
//! * A loopback server that checks the signature against the request as it
//!   arrived, the way a service does.
//!
//! The suite writes requests as raw HTTP, some of which a [`url::Url`] cannot
//! carry (a space in the path, `..` segments, folded header lines). Those
//! cases say what the `Url` turns them into; the signer signs what is sent.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use patient_http::{
    client::{ClientConfig, HttpClient, HttpVersionPref, OutgoingRequest},
    preprocess::{AwsCredentials, PreparedRequest, Preprocessor, SigV4, SignatureParts},
};
use ring::{digest, hmac};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use url::Url;

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// The hash of the body `Param1=value1` of the form cases.
const FORM_SHA256: &str = "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e";
/// The session token of the suite's `post-sts-token` cases.
const STS_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

// ---------------------------------------------------------------- helpers

fn credentials(session_token: Option<&str>) -> AwsCredentials {
    AwsCredentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        session_token: session_token.map(Into::into),
    }
}

/// The suite's signer: other services' rules (normalized, double-encoded path).
fn suite() -> SigV4 {
    SigV4::new(credentials(None), "us-east-1", "service")
}

/// The suite's credentials and scope, with S3's path rules.
fn suite_s3_rules() -> SigV4 {
    suite().s3_path_rules(true)
}

/// 2015-08-30T12:36:00Z.
fn suite_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_440_938_160)
}

fn url(text: &str) -> Url {
    text.parse().unwrap()
}

/// A request with headers appended in order (a name given twice is sent twice).
fn request(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> PreparedRequest {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    PreparedRequest::new(
        method,
        self::url(url),
        map,
        Bytes::copy_from_slice(body.as_bytes()),
    )
}

fn sign(signer: &SigV4, request: &mut PreparedRequest, at: SystemTime) -> SignatureParts {
    signer.sign(request, at).unwrap()
}

/// The lines of a canonical request, as the suite's `.creq` files hold them.
fn lines(lines: &[&str]) -> String {
    lines.join("\n")
}

/// The canonical request of the suite's cases that sign `host` and
/// `x-amz-date` only and have no body.
fn vanilla(method: &str, path: &str, query: &str) -> String {
    lines(&[
        method,
        path,
        query,
        "host:example.amazonaws.com",
        "x-amz-date:20150830T123600Z",
        "",
        "host;x-amz-date",
        EMPTY_SHA256,
    ])
}

/// Asserts what the suite expects of a signed request: its canonical
/// request, the hash ending its string to sign, and its `Authorization`.
fn assert_suite(
    request: &PreparedRequest,
    parts: &SignatureParts,
    canonical_request: &str,
    canonical_request_hash: &str,
    signed_headers: &str,
    signature: &str,
) {
    assert_eq!(parts.canonical_request, canonical_request);
    assert_eq!(
        parts.string_to_sign,
        format!(
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n{canonical_request_hash}"
        )
    );
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
         SignedHeaders={signed_headers}, Signature={signature}"
    );
    assert_eq!(parts.authorization, authorization);
    assert_eq!(parts.signed_headers, signed_headers);
    assert_eq!(parts.signature, signature);
    assert_eq!(request.headers()["authorization"], authorization.as_str());
    assert_eq!(request.headers()["x-amz-date"], "20150830T123600Z");
}

/// Signs `method url` (no headers, no body) with `signer` and checks it
/// against a suite case that signs `host` and `x-amz-date` only.
fn assert_vanilla(
    signer: &SigV4,
    method: Method,
    url: &str,
    canonical: (&str, &str),
    canonical_request_hash: &str,
    signature: &str,
) {
    let mut req = request(method.clone(), url, &[], "");
    let parts = sign(signer, &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &vanilla(method.as_str(), canonical.0, canonical.1),
        canonical_request_hash,
        "host;x-amz-date",
        signature,
    );
}

const VANILLA_GET_HASH: &str = "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63";
const VANILLA_GET_SIGNATURE: &str =
    "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
const VANILLA_POST_HASH: &str = "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87";
const VANILLA_POST_SIGNATURE: &str =
    "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b";

// ---------------------------------------------------------------- vanilla and query

#[test]
fn get_vanilla() {
    assert_vanilla(
        &suite(),
        Method::GET,
        "https://example.amazonaws.com/",
        ("/", ""),
        VANILLA_GET_HASH,
        VANILLA_GET_SIGNATURE,
    );
}

/// The suite's `get-vanilla-query` request has no query at all.
#[test]
fn get_vanilla_query() {
    assert_vanilla(
        &suite(),
        Method::GET,
        "https://example.amazonaws.com/",
        ("/", ""),
        VANILLA_GET_HASH,
        VANILLA_GET_SIGNATURE,
    );
}

#[test]
fn get_vanilla_empty_query_key() {
    assert_vanilla(
        &suite(),
        Method::GET,
        "https://example.amazonaws.com/?Param1=value1",
        ("/", "Param1=value1"),
        "1e24db194ed7d0eec2de28d7369675a243488e08526e8c1c73571282f7c517ab",
        "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
    );
}

/// Same name twice: sorted by value, upper case first (byte order).
#[test]
fn get_vanilla_query_order_key() {
    assert_vanilla(
        &suite(),
        Method::GET,
        "https://example.amazonaws.com/?Param1=value2&Param1=Value1",
        ("/", "Param1=Value1&Param1=value2"),
        "704b4cef673542d84cdff252633f065e8daeba5f168b77116f8b1bcaf3d38f89",
        "eedbc4e291e521cf13422ffca22be7d2eb8146eecf653089df300a15b2382bd1",
    );
}

#[test]
fn get_vanilla_query_order_value() {
    assert_vanilla(
        &suite(),
        Method::GET,
        "https://example.amazonaws.com/?Param1=value2&Param1=value1",
        ("/", "Param1=value1&Param1=value2"),
        "c968629d70850097a2d8781c9bf7edcb988b04cac14cca9be4acc3595f884606",
        "5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694",
    );
}

#[test]
fn get_vanilla_query_order_key_case() {
    assert_vanilla(
        &suite(),
        Method::GET,
        "https://example.amazonaws.com/?Param2=value2&Param1=value1",
        ("/", "Param1=value1&Param2=value2"),
        "816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0",
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    );
}

/// From the revised suite: parameters sort by their encoded names, so `%E1…`
/// comes first and `Param` before `Param-3` (a name, not `Param=…`, sorts).
#[test]
fn get_vanilla_query_order_encoded() {
    assert_vanilla(
        &suite(),
        Method::GET,
        "https://example.amazonaws.com/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1",
        ("/", "%E1%88%B4=Value1&Param=Value2&Param-3=Value3"),
        "868294f5c38bd141c4972a373a76654f1418a8e4fc18b2e7903ae45e8ae0ec71",
        "371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
    );
}

#[test]
fn get_vanilla_query_unreserved() {
    let unreserved = "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    assert_vanilla(
        &suite(),
        Method::GET,
        &format!("https://example.amazonaws.com/?{unreserved}={unreserved}"),
        ("/", &format!("{unreserved}={unreserved}")),
        "c30d4703d9f799439be92736156d47ccfb2d879ddf56f5befa6d1d6aab979177",
        "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
    );
}

/// The suite writes the name as raw UTF-8; a `Url` sends it percent-encoded,
/// which decodes to the same name.
#[test]
fn get_vanilla_utf8_query() {
    let raw = "https://example.amazonaws.com/?\u{1234}=bar";
    assert_eq!(url(raw).query(), Some("%E1%88%B4=bar"));
    assert_vanilla(
        &suite(),
        Method::GET,
        raw,
        ("/", "%E1%88%B4=bar"),
        "eb30c5bed55734080471a834cc727ae56beb50e5f39d1bff6d0d38cb192a7073",
        "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
    );
}

#[test]
fn post_vanilla() {
    assert_vanilla(
        &suite(),
        Method::POST,
        "https://example.amazonaws.com/",
        ("/", ""),
        VANILLA_POST_HASH,
        VANILLA_POST_SIGNATURE,
    );
}

#[test]
fn post_vanilla_query() {
    assert_vanilla(
        &suite(),
        Method::POST,
        "https://example.amazonaws.com/?Param1=value1",
        ("/", "Param1=value1"),
        "9d659678c1756bb3113e2ce898845a0a79dbbc57b740555917687f1b3340fbbd",
        "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
    );
}

/// The suite's request for this case is the same as `post-vanilla-query`.
#[test]
fn post_vanilla_empty_query_value() {
    assert_vanilla(
        &suite(),
        Method::POST,
        "https://example.amazonaws.com/?Param1=value1",
        ("/", "Param1=value1"),
        "9d659678c1756bb3113e2ce898845a0a79dbbc57b740555917687f1b3340fbbd",
        "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
    );
}

/// A parameter without `=` or with nothing after it signs as `name=`; the
/// S3 documentation's "GET Bucket Lifecycle" (`?lifecycle`) relies on it.
#[test]
fn empty_query_values_sign_as_name_equals() {
    for query in ["?a&b=", "?b=&a=", "?a=&&b"] {
        let mut req = request(
            Method::GET,
            &format!("https://example.amazonaws.com/{query}"),
            &[],
            "",
        );
        let parts = sign(&suite(), &mut req, suite_time());
        assert_eq!(
            parts.canonical_request.lines().nth(2),
            Some("a=&b="),
            "{query}"
        );
    }
}

// ---------------------------------------------------------------- paths

#[test]
fn get_unreserved() {
    let path = "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    for signer in [suite(), suite_s3_rules()] {
        assert_vanilla(
            &signer,
            Method::GET,
            &format!("https://example.amazonaws.com{path}"),
            (path, ""),
            "6a968768eefaa713e2a6b16b589a8ea192661f098f37349f4e2c0082757446f9",
            "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
        );
    }
}

/// The suite puts raw UTF-8 on the request line and signs it encoded once. A
/// `Url` sends `/%E1%88%B4`: S3's rules sign that (the suite's vector), other
/// services sign what was sent encoded again.
#[test]
fn get_utf8() {
    let raw = "https://example.amazonaws.com/\u{1234}";
    assert_eq!(url(raw).path(), "/%E1%88%B4");
    assert_vanilla(
        &suite_s3_rules(),
        Method::GET,
        raw,
        ("/%E1%88%B4", ""),
        "2a0a97d02205e45ce2e994789806b19270cfbbb0921b278ccf58f5249ac42102",
        "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
    );
    assert_vanilla(
        &suite(),
        Method::GET,
        raw,
        ("/%25E1%2588%25B4", ""),
        "05a9d6899022a3640ab14690cea6ff574ab4eef0d900ff180107a5fc5b93e126",
        "697b34846207a3f72246f99d74ae1ee4fe54f44bb06730c58a0d339eb079596d",
    );
}

/// `get-space` (and the revised suite's `get-space-unnormalized`): a raw space
/// on the request line, signed as `%20`. A `Url` sends `%20`: S3's rules sign
/// it as is (the suite's vector), other services as `%2520`.
#[test]
fn get_space() {
    let raw = "https://example.amazonaws.com/example space/";
    assert_eq!(url(raw).path(), "/example%20space/");
    assert_vanilla(
        &suite_s3_rules(),
        Method::GET,
        raw,
        ("/example%20space/", ""),
        "63ee75631ed7234ae61b5f736dfc7754cdccfedbff4b5128a915706ee9390d86",
        "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
    );
    assert_vanilla(
        &suite(),
        Method::GET,
        raw,
        ("/example%2520space/", ""),
        "6a04b36fa5a84d8d24b4287d506da70f4d5289a1772e6c608495a841a8f38627",
        "446b817944c553435b35e813c261ff4e161fff982d1bacdef1c87f6785dd1662",
    );
}

/// `normalize-path/get-slash`: other services sign `//` as `/`; the revised
/// suite's `get-slash-unnormalized` signs it as sent (S3's rules).
#[test]
fn get_slash() {
    let raw = "https://example.amazonaws.com//";
    assert_eq!(url(raw).path(), "//");
    assert_vanilla(
        &suite(),
        Method::GET,
        raw,
        ("/", ""),
        VANILLA_GET_HASH,
        VANILLA_GET_SIGNATURE,
    );
    assert_vanilla(
        &suite_s3_rules(),
        Method::GET,
        raw,
        ("//", ""),
        "80cb39203d058af815de2b79250ff56e1b73eb9b4718c86556cdc6f150c5d209",
        "c88bcd3d312d75078c0cd961d6deae3f4c754924b01669efcfcb439fd5e5b76e",
    );
}

/// `normalize-path/get-slashes` and the revised suite's
/// `get-slashes-unnormalized`.
#[test]
fn get_slashes() {
    let raw = "https://example.amazonaws.com//example//";
    assert_eq!(url(raw).path(), "//example//");
    assert_vanilla(
        &suite(),
        Method::GET,
        raw,
        ("/example/", ""),
        "cb96b4ac96d501f7c5c15bc6d67b3035061cfced4af6585ad927f7e6c985c015",
        "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
    );
    assert_vanilla(
        &suite_s3_rules(),
        Method::GET,
        raw,
        ("//example//", ""),
        "528ec3105ee1f34ab014bb0a1a45da0ed2742a4fea3555149e5b4d5d201eb240",
        "87cca117541a147f6df867677d98a7d80dff226d2bfca9e4ffa899665623c7e5",
    );
}

/// The dot-segment cases of `normalize-path`. A `Url` removes `.` and `..`
/// when it is parsed, so the request sent is the normalized one and both
/// rules sign the suite's normalized vector. The revised suite's
/// `-unnormalized` variants (`/example/..`, `/./` … signed as written) need a
/// request line that a `Url` never sends.
#[test]
fn dot_segments_are_removed_before_signing() {
    let cases = [
        // get-relative
        ("/example/..", "/", VANILLA_GET_HASH, VANILLA_GET_SIGNATURE),
        // get-relative-relative
        (
            "/example1/example2/../..",
            "/",
            VANILLA_GET_HASH,
            VANILLA_GET_SIGNATURE,
        ),
        // get-slash-dot-slash
        ("/./", "/", VANILLA_GET_HASH, VANILLA_GET_SIGNATURE),
        // get-slash-pointless-dot
        (
            "/./example",
            "/example",
            "214d50c111a8edc4819da6a636336472c916b5240f51e9a51b5c3305180cf702",
            "ef75d96142cf21edca26f06005da7988e4f8dc83a165a80865db7089db637ec5",
        ),
    ];
    for (path, sent, hash, signature) in cases {
        let raw = format!("https://example.amazonaws.com{path}");
        assert_eq!(url(&raw).path(), sent, "{path}");
        for signer in [suite(), suite_s3_rules()] {
            assert_vanilla(&signer, Method::GET, &raw, (sent, ""), hash, signature);
        }
    }
}

// ---------------------------------------------------------------- headers

#[test]
fn get_header_key_duplicate() {
    let mut req = request(
        Method::GET,
        "https://example.amazonaws.com/",
        &[
            ("My-Header1", "value2"),
            ("My-Header1", "value2"),
            ("My-Header1", "value1"),
        ],
        "",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "GET",
            "/",
            "",
            "host:example.amazonaws.com",
            "my-header1:value2,value2,value1",
            "x-amz-date:20150830T123600Z",
            "",
            "host;my-header1;x-amz-date",
            EMPTY_SHA256,
        ]),
        "dc7f04a3abfde8d472b0ab1a418b741b7c67174dad1551b4117b15527fbe966c",
        "host;my-header1;x-amz-date",
        "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
    );
}

#[test]
fn get_header_value_order() {
    let mut req = request(
        Method::GET,
        "https://example.amazonaws.com/",
        &[
            ("My-Header1", "value4"),
            ("My-Header1", "value1"),
            ("My-Header1", "value3"),
            ("My-Header1", "value2"),
        ],
        "",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "GET",
            "/",
            "",
            "host:example.amazonaws.com",
            "my-header1:value4,value1,value3,value2",
            "x-amz-date:20150830T123600Z",
            "",
            "host;my-header1;x-amz-date",
            EMPTY_SHA256,
        ]),
        "31ce73cd3f3d9f66977ad3dd957dc47af14df92fcd8509f59b349e9137c58b86",
        "host;my-header1;x-amz-date",
        "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
    );
}

#[test]
fn get_header_value_trim() {
    let mut req = request(
        Method::GET,
        "https://example.amazonaws.com/",
        &[("My-Header1", " value1"), ("My-Header2", " \"a   b   c\"")],
        "",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "GET",
            "/",
            "",
            "host:example.amazonaws.com",
            "my-header1:value1",
            "my-header2:\"a b c\"",
            "x-amz-date:20150830T123600Z",
            "",
            "host;my-header1;my-header2;x-amz-date",
            EMPTY_SHA256,
        ]),
        "a726db9b0df21c14f559d0a978e563112acb1b9e05476f0a6a1c7d68f28605c7",
        "host;my-header1;my-header2;x-amz-date",
        "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
    );
}

/// `get-header-value-multiline` sends `My-Header1:value1` followed by the
/// continuation lines `  value2` and `     value3` (obsolete line folding).
/// A header value cannot hold a line break, so the request reaches the signer
/// in one of two shapes:
///
/// * unfolded, as RFC 9112 tells a recipient to read it (each fold becomes
///   spaces): one value, signed `value1 value2 value3` — the revised suite's
///   corrected vector;
/// * one header line per value: signed `value1,value2,value3` — the original
///   suite's vector.
#[test]
fn get_header_value_multiline() {
    assert!(HeaderValue::from_str("value1\n  value2\n     value3").is_err());

    let mut unfolded = request(
        Method::GET,
        "https://example.amazonaws.com/",
        &[("My-Header1", "value1   value2      value3")],
        "",
    );
    let parts = sign(&suite(), &mut unfolded, suite_time());
    assert_suite(
        &unfolded,
        &parts,
        &lines(&[
            "GET",
            "/",
            "",
            "host:example.amazonaws.com",
            "my-header1:value1 value2 value3",
            "x-amz-date:20150830T123600Z",
            "",
            "host;my-header1;x-amz-date",
            EMPTY_SHA256,
        ]),
        "e99419459a677bc11de234014be3c4e72c1ea5b454ceb58b613061f5d7a162e8",
        "host;my-header1;x-amz-date",
        "cfd34249e4b1c8d6b91ef74165d41a32e5fab3306300901bb65a51a73575eefd",
    );

    let mut lines_apart = request(
        Method::GET,
        "https://example.amazonaws.com/",
        &[
            ("My-Header1", "value1"),
            ("My-Header1", "  value2"),
            ("My-Header1", "     value3"),
        ],
        "",
    );
    let parts = sign(&suite(), &mut lines_apart, suite_time());
    assert_suite(
        &lines_apart,
        &parts,
        &lines(&[
            "GET",
            "/",
            "",
            "host:example.amazonaws.com",
            "my-header1:value1,value2,value3",
            "x-amz-date:20150830T123600Z",
            "",
            "host;my-header1;x-amz-date",
            EMPTY_SHA256,
        ]),
        "b7b6cbfd8a0430b78891e986784da2630c8a135a8595cec25b26ea94f926ee55",
        "host;my-header1;x-amz-date",
        "ba17b383a53190154eb5fa66a1b836cc297cc0a3d70a5d00705980573d8ff790",
    );
}

/// Header names are case-insensitive: the suite's `X-Amz-Date` signs as
/// `x-amz-date` (and the signer's own time replaces the value given).
#[test]
fn post_header_key_case() {
    let mut req = request(
        Method::POST,
        "https://example.amazonaws.com/",
        &[("X-Amz-Date", "20000101T000000Z")],
        "",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &vanilla("POST", "/", ""),
        VANILLA_POST_HASH,
        "host;x-amz-date",
        VANILLA_POST_SIGNATURE,
    );
}

#[test]
fn post_header_key_sort() {
    let mut req = request(
        Method::POST,
        "https://example.amazonaws.com/",
        &[("My-Header1", "value1")],
        "",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "POST",
            "/",
            "",
            "host:example.amazonaws.com",
            "my-header1:value1",
            "x-amz-date:20150830T123600Z",
            "",
            "host;my-header1;x-amz-date",
            EMPTY_SHA256,
        ]),
        "9368318c2967cf6de74404b30c65a91e8f6253e0a8659d6d5319f1a812f87d65",
        "host;my-header1;x-amz-date",
        "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
    );
}

#[test]
fn post_header_value_case() {
    let mut req = request(
        Method::POST,
        "https://example.amazonaws.com/",
        &[("My-Header1", "VALUE1")],
        "",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "POST",
            "/",
            "",
            "host:example.amazonaws.com",
            "my-header1:VALUE1",
            "x-amz-date:20150830T123600Z",
            "",
            "host;my-header1;x-amz-date",
            EMPTY_SHA256,
        ]),
        "d51ced243e649e3de6ef63afbbdcbca03131a21a7103a1583706a64618606a93",
        "host;my-header1;x-amz-date",
        "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
    );
}

/// Headers that proxies and the transport change on the way are left out.
#[test]
fn hop_by_hop_and_agent_headers_are_not_signed() {
    let mut req = request(
        Method::GET,
        "https://example.amazonaws.com/",
        &[
            ("User-Agent", "PatientHttp"),
            ("Connection", "keep-alive"),
            ("Expect", "100-continue"),
            (
                "X-Amzn-Trace-Id",
                "Root=1-5759e988-bd862e3fe1be46a994272793",
            ),
            ("Authorization", "Bearer stale"),
        ],
        "",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &vanilla("GET", "/", ""),
        VANILLA_GET_HASH,
        "host;x-amz-date",
        VANILLA_GET_SIGNATURE,
    );
    assert_eq!(req.headers().get_all("authorization").iter().count(), 1);
}

// ---------------------------------------------------------------- bodies

#[test]
fn post_x_www_form_urlencoded() {
    let mut req = request(
        Method::POST,
        "https://example.amazonaws.com/",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "Param1=value1",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "POST",
            "/",
            "",
            "content-type:application/x-www-form-urlencoded",
            "host:example.amazonaws.com",
            "x-amz-date:20150830T123600Z",
            "",
            "content-type;host;x-amz-date",
            FORM_SHA256,
        ]),
        "42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281",
        "content-type;host;x-amz-date",
        "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
    );
}

#[test]
fn post_x_www_form_urlencoded_parameters() {
    let mut req = request(
        Method::POST,
        "https://example.amazonaws.com/",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded; charset=utf8",
        )],
        "Param1=value1",
    );
    let parts = sign(&suite(), &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "POST",
            "/",
            "",
            "content-type:application/x-www-form-urlencoded; charset=utf8",
            "host:example.amazonaws.com",
            "x-amz-date:20150830T123600Z",
            "",
            "content-type;host;x-amz-date",
            FORM_SHA256,
        ]),
        "2e1cf7ed91881a30569e46552437e4156c823447bf1781b921b5d486c568dd1c",
        "content-type;host;x-amz-date",
        "1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe",
    );
}

/// The revised suite signs the form cases with `x-amz-content-sha256` and
/// the request's `Content-Length`.
#[test]
fn post_x_www_form_urlencoded_with_content_sha256() {
    let cases = [
        (
            "application/x-www-form-urlencoded",
            "b1edd1d03544c25390e32085d55b57acc9a3961bb59415ff86c45c3d89d16cfb",
            "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b",
        ),
        (
            "application/x-www-form-urlencoded; charset=utf-8",
            "a89f1a5b53e37702ee6363ce1da3ce8f54386f3c8f352ae652153c2982a0bc4d",
            "328d1b9eaadca9f5818ef05e8392801e091653bafec24fcab71e7344e7f51422",
        ),
    ];
    for (content_type, hash, signature) in cases {
        let mut req = request(
            Method::POST,
            "https://example.amazonaws.com/",
            &[("Content-Type", content_type), ("Content-Length", "13")],
            "Param1=value1",
        );
        let signer = suite().content_sha256_header(true);
        let parts = sign(&signer, &mut req, suite_time());
        let signed = "content-length;content-type;host;x-amz-content-sha256;x-amz-date";
        assert_suite(
            &req,
            &parts,
            &lines(&[
                "POST",
                "/",
                "",
                "content-length:13",
                &format!("content-type:{content_type}"),
                "host:example.amazonaws.com",
                &format!("x-amz-content-sha256:{FORM_SHA256}"),
                "x-amz-date:20150830T123600Z",
                "",
                signed,
                FORM_SHA256,
            ]),
            hash,
            signed,
            signature,
        );
        assert_eq!(req.headers()["x-amz-content-sha256"], FORM_SHA256);
    }
}

// ---------------------------------------------------------------- session tokens

/// `post-sts-token/post-sts-header-before`: the token is signed.
#[test]
fn post_sts_header_before() {
    let signer = SigV4::new(credentials(Some(STS_TOKEN)), "us-east-1", "service");
    let mut req = request(Method::POST, "https://example.amazonaws.com/", &[], "");
    let parts = sign(&signer, &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "POST",
            "/",
            "",
            "host:example.amazonaws.com",
            "x-amz-date:20150830T123600Z",
            &format!("x-amz-security-token:{STS_TOKEN}"),
            "",
            "host;x-amz-date;x-amz-security-token",
            EMPTY_SHA256,
        ]),
        "c237e1b440d4c63c32ca95b5b99481081cb7b13c7e40434868e71567c1a882f6",
        "host;x-amz-date;x-amz-security-token",
        "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
    );
    assert_eq!(req.headers()["x-amz-security-token"], STS_TOKEN);
}

/// `post-sts-token/post-sts-header-after`: the token is added after signing,
/// so the signature is `post-vanilla`'s.
#[test]
fn post_sts_header_after() {
    let signer =
        SigV4::new(credentials(Some(STS_TOKEN)), "us-east-1", "service").sign_session_token(false);
    // A token the request already carried is not signed either.
    let mut req = request(
        Method::POST,
        "https://example.amazonaws.com/",
        &[("X-Amz-Security-Token", "stale")],
        "",
    );
    let parts = sign(&signer, &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &vanilla("POST", "/", ""),
        VANILLA_POST_HASH,
        "host;x-amz-date",
        VANILLA_POST_SIGNATURE,
    );
    let tokens: Vec<_> = req
        .headers()
        .get_all("x-amz-security-token")
        .iter()
        .collect();
    assert_eq!(tokens, [STS_TOKEN]);
}

/// From the revised suite.
#[test]
fn get_vanilla_with_session_token() {
    let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
    let signer = SigV4::new(credentials(Some(token)), "us-east-1", "service");
    let mut req = request(Method::GET, "https://example.amazonaws.com/", &[], "");
    let parts = sign(&signer, &mut req, suite_time());
    assert_suite(
        &req,
        &parts,
        &lines(&[
            "GET",
            "/",
            "",
            "host:example.amazonaws.com",
            "x-amz-date:20150830T123600Z",
            &format!("x-amz-security-token:{token}"),
            "",
            "host;x-amz-date;x-amz-security-token",
            EMPTY_SHA256,
        ]),
        "067b36aa60031588cea4a4cde1f21215227a047690c72247f1d70b32fbbfad2b",
        "host;x-amz-date;x-amz-security-token",
        "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8",
    );
}

/// As a preprocessor, with a fixed time: the same signature as `sign`.
#[tokio::test]
async fn preprocessor_signs_like_sign() {
    let signer = suite().fixed_time(suite_time());
    let mut req = request(Method::GET, "https://example.amazonaws.com/", &[], "");
    signer.process(&mut req).await.unwrap();
    assert!(req.headers()["authorization"]
        .to_str()
        .unwrap()
        .ends_with(VANILLA_GET_SIGNATURE));
}

// ---------------------------------------------------------------- S3 documentation

fn s3_docs_signer() -> SigV4 {
    SigV4::new(
        AwsCredentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        },
        "us-east-1",
        "s3",
    )
}

/// 2013-05-24T00:00:00Z.
fn s3_docs_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_369_353_600)
}

fn assert_s3_docs(
    parts: &SignatureParts,
    canonical_request: &str,
    canonical_request_hash: &str,
    signed_headers: &str,
    signature: &str,
) {
    assert_eq!(parts.canonical_request, canonical_request);
    assert_eq!(
        parts.string_to_sign,
        format!(
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n{canonical_request_hash}"
        )
    );
    assert_eq!(
        parts.authorization,
        format!(
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders={signed_headers}, Signature={signature}"
        )
    );
}

#[test]
fn s3_get_object() {
    let mut req = request(
        Method::GET,
        "https://examplebucket.s3.amazonaws.com/test.txt",
        &[("Range", "bytes=0-9")],
        "",
    );
    let parts = sign(&s3_docs_signer(), &mut req, s3_docs_time());
    assert_s3_docs(
        &parts,
        &lines(&[
            "GET",
            "/test.txt",
            "",
            "host:examplebucket.s3.amazonaws.com",
            "range:bytes=0-9",
            &format!("x-amz-content-sha256:{EMPTY_SHA256}"),
            "x-amz-date:20130524T000000Z",
            "",
            "host;range;x-amz-content-sha256;x-amz-date",
            EMPTY_SHA256,
        ]),
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972",
        "host;range;x-amz-content-sha256;x-amz-date",
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    );
}

/// "PUT Object": the key `test$file.text`. A `Url` sends `$` as it is; S3
/// signs the key encoded once, `%24`.
#[test]
fn s3_put_object() {
    let raw = "https://examplebucket.s3.amazonaws.com/test$file.text";
    assert_eq!(url(raw).path(), "/test$file.text");
    let body_sha256 = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072";
    let mut req = request(
        Method::PUT,
        raw,
        &[
            ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ],
        "Welcome to Amazon S3.",
    );
    let parts = sign(&s3_docs_signer(), &mut req, s3_docs_time());
    assert_s3_docs(
        &parts,
        &lines(&[
            "PUT",
            "/test%24file.text",
            "",
            "date:Fri, 24 May 2013 00:00:00 GMT",
            "host:examplebucket.s3.amazonaws.com",
            &format!("x-amz-content-sha256:{body_sha256}"),
            "x-amz-date:20130524T000000Z",
            "x-amz-storage-class:REDUCED_REDUNDANCY",
            "",
            "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
            body_sha256,
        ]),
        "9e0e90d9c76de8fa5b200d8c849cd5b8dc7a3be3951ddb7f6a76b4158342019d",
        "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    );
    // The key sent already encoded signs the same.
    let mut encoded = request(
        Method::PUT,
        "https://examplebucket.s3.amazonaws.com/test%24file.text",
        &[
            ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ],
        "Welcome to Amazon S3.",
    );
    let again = sign(&s3_docs_signer(), &mut encoded, s3_docs_time());
    assert_eq!(again.signature, parts.signature);
}

/// "GET Bucket Lifecycle": `?lifecycle` signs as `lifecycle=`.
#[test]
fn s3_get_bucket_lifecycle() {
    let mut req = request(
        Method::GET,
        "https://examplebucket.s3.amazonaws.com/?lifecycle",
        &[],
        "",
    );
    let parts = sign(&s3_docs_signer(), &mut req, s3_docs_time());
    assert_s3_docs(
        &parts,
        &lines(&[
            "GET",
            "/",
            "lifecycle=",
            "host:examplebucket.s3.amazonaws.com",
            &format!("x-amz-content-sha256:{EMPTY_SHA256}"),
            "x-amz-date:20130524T000000Z",
            "",
            "host;x-amz-content-sha256;x-amz-date",
            EMPTY_SHA256,
        ]),
        "9766c798316ff2757b517bc739a67f6213b4ab36dd5da2f94eaebf79c77395ca",
        "host;x-amz-content-sha256;x-amz-date",
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
    );
}

/// "GET Bucket (List Objects)", with the parameters sent in the other order.
#[test]
fn s3_list_objects() {
    let mut req = request(
        Method::GET,
        "https://examplebucket.s3.amazonaws.com/?prefix=J&max-keys=2",
        &[],
        "",
    );
    let parts = sign(&s3_docs_signer(), &mut req, s3_docs_time());
    assert_s3_docs(
        &parts,
        &lines(&[
            "GET",
            "/",
            "max-keys=2&prefix=J",
            "host:examplebucket.s3.amazonaws.com",
            &format!("x-amz-content-sha256:{EMPTY_SHA256}"),
            "x-amz-date:20130524T000000Z",
            "",
            "host;x-amz-content-sha256;x-amz-date",
            EMPTY_SHA256,
        ]),
        "df57d21db20da04d7fa30298dd4488ba3a2b47ca3a489c74750e0f1e7df1b9b7",
        "host;x-amz-content-sha256;x-amz-date",
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    );
}

// ---------------------------------------------------------------- on the wire

/// A request as a loopback server read it off the socket.
struct Received {
    method: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Accepts one HTTP/1.1 request on `127.0.0.1:0`, answers `200` and hands
/// over the request exactly as it arrived.
async fn capture_one() -> (u16, tokio::task::JoinHandle<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed before the request ended");
            data.extend_from_slice(&buf[..n]);
            if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
        };
        let head = String::from_utf8(data[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap().split(' ');
        let method = request_line.next().unwrap().to_owned();
        let target = request_line.next().unwrap().to_owned();
        let headers: Vec<(String, Vec<u8>)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().as_bytes().to_vec())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .map_or(0, |(_, v)| std::str::from_utf8(v).unwrap().parse().unwrap());
        let mut body = data[head_end + 4..].to_vec();
        while body.len() < length {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed before the body ended");
            body.extend_from_slice(&buf[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        Received {
            method,
            target,
            headers,
            body,
        }
    });
    (port, task)
}

/// The canonical request a service builds from a request as it arrived,
/// written from the AWS documentation ("Create a canonical request"),
/// independently of the signer.
fn service_canonical_request(received: &Received, s3: bool) -> String {
    fn decode(s: &str, plus_is_space: bool) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let digit = |j: usize| b.get(j).and_then(|&d| (d as char).to_digit(16));
            if let (b'%', Some(high), Some(low)) = (b[i], digit(i + 1), digit(i + 2)) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            out.push(if plus_is_space && b[i] == b'+' {
                b' '
            } else {
                b[i]
            });
            i += 1;
        }
        out
    }
    fn encode(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }
    let (path, query) = received
        .target
        .split_once('?')
        .unwrap_or((&received.target, ""));
    let uri = if s3 {
        // S3 decodes the path and encodes each segment once.
        path.split('/')
            .map(|segment| encode(&decode(segment, false)))
            .collect::<Vec<_>>()
            .join("/")
    } else {
        // Others normalize the path as received and encode it again.
        let mut stack: Vec<&str> = Vec::new();
        for segment in path.split('/') {
            match segment {
                "" | "." => {}
                ".." => {
                    stack.pop();
                }
                s => stack.push(s),
            }
        }
        let mut uri = format!(
            "/{}",
            stack
                .iter()
                .map(|s| encode(s.as_bytes()))
                .collect::<Vec<_>>()
                .join("/")
        );
        if path.ends_with('/') && !stack.is_empty() {
            uri.push('/');
        }
        uri
    };
    let mut params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (encode(&decode(k, true)), encode(&decode(v, true)))
        })
        .collect();
    params.sort();
    let query = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");

    let authorization = received
        .headers
        .iter()
        .find(|(name, _)| name == "authorization")
        .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        .unwrap();
    let signed_headers = authorization
        .split("SignedHeaders=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned();
    let mut headers = String::new();
    for name in signed_headers.split(';') {
        let values: Vec<String> = received
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| {
                String::from_utf8(v.clone())
                    .unwrap()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        assert!(!values.is_empty(), "signed header {name} was not sent");
        headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let payload = digest::digest(&digest::SHA256, &received.body);
    let payload: String = payload
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{}\n{uri}\n{query}\n{headers}\n{signed_headers}\n{payload}",
        received.method
    )
}

/// The signature a service computes over a canonical request.
fn service_signature(canonical_request: &str, service: &str, datetime: &str) -> String {
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let mac = |key: &[u8], data: &[u8]| -> Vec<u8> {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
            .as_ref()
            .to_vec()
    };
    let date = &datetime[..8];
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{datetime}\n{date}/us-east-1/{service}/aws4_request\n{}",
        hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
    );
    let mut key = mac(
        b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        date.as_bytes(),
    );
    for part in ["us-east-1", service, "aws4_request"] {
        key = mac(&key, part.as_bytes());
    }
    hex(&mac(&key, string_to_sign.as_bytes()))
}

/// Signs a request with awkward parts, sends it through the client to a
/// loopback server and checks the signature against what arrived: the
/// service's canonical request must be the signer's.
async fn signature_verifies_on_arrival(service: &str) {
    let (port, received) = capture_one().await;
    let url = format!(
        "http://127.0.0.1:{port}//a b/./c%2Fd/\u{1234}/x+y!$'()*,;=:@?b=2&a=%FF&a=1+2&c&e=%7e%2b&d=x%20y"
    );
    let mut prepared = request(
        Method::POST,
        &url,
        &[
            ("Content-Type", "application/json"),
            ("X-Amz-Meta-Note", "  two   spaces\tand a tab  "),
            ("My-Header", "first"),
            ("My-Header", " second "),
            ("User-Agent", "sigv4-test"),
        ],
        "{\"x\":1}",
    );
    let signer = SigV4::new(credentials(Some("token")), "us-east-1", service);
    let parts = sign(&signer, &mut prepared, suite_time());

    let client = HttpClient::new(
        ClientConfig::builder()
            .http_version(HttpVersionPref::Http1Only)
            .build()
            .unwrap(),
    )
    .unwrap();
    let mut outgoing = OutgoingRequest::new(Method::POST, prepared.url().clone());
    outgoing.headers = prepared.headers().clone();
    outgoing.body = prepared.body().clone();
    let response = client.send(outgoing).await.unwrap();
    assert_eq!(response.status, 200);

    let received = received.await.unwrap();
    let canonical = service_canonical_request(&received, service == "s3");
    assert_eq!(canonical, parts.canonical_request);
    assert_eq!(
        service_signature(&canonical, service, "20150830T123600Z"),
        parts.signature
    );
}

#[tokio::test]
async fn signature_verifies_on_arrival_for_other_services() {
    signature_verifies_on_arrival("execute-api").await;
}

#[tokio::test]
async fn signature_verifies_on_arrival_for_s3() {
    signature_verifies_on_arrival("s3").await;
}
