//! `/rest/v1` end to end: a `todos` table with Supabase-style RLS policies
//! (`auth.uid() = user_id`), two users and the service role, through the
//! PostgREST calls supabase-js's query builder makes, errors included.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use common::*;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

struct Rest<'a> {
    t: &'a TestServer,
    http: Client,
    anon: String,
}

impl<'a> Rest<'a> {
    fn new(t: &'a TestServer) -> Rest<'a> {
        Rest {
            t,
            http: Client::new(),
            anon: t.server.state.jwt.api_key("anon"),
        }
    }

    /// A request as `token` (the anon key when `None`), with the anon `apikey`.
    fn req(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.t.url(&format!("/rest/v1/{path}")))
            .header("apikey", &self.anon)
            .bearer_auth(token.unwrap_or(&self.anon))
    }

    /// A GET refused with 400 and PostgREST's `code`.
    async fn refused(&self, path: &str, code: &str) {
        let (status, _, body) = self.send(self.req(Method::GET, path, None)).await;
        assert_eq!(
            (status, &body["code"]),
            (StatusCode::BAD_REQUEST, &json!(code)),
            "{path}: {body}"
        );
    }

    /// A GET as anon that must answer 200; its body.
    async fn get_ok(&self, path: &str) -> Value {
        let (status, _, body) = self.send(self.req(Method::GET, path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    }

    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let res = rb.send().await.unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let text = res.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, headers, body)
    }
}

async fn schema(t: &TestServer) {
    t.exec(
        "CREATE TABLE public.lists (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);
         CREATE TABLE public.todos (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             user_id uuid NOT NULL DEFAULT auth.uid(),
             list_id bigint REFERENCES public.lists (id),
             title text NOT NULL,
             done boolean NOT NULL DEFAULT false,
             rank int);
         ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_read ON public.todos FOR SELECT TO authenticated USING (auth.uid() = user_id);
         CREATE POLICY own_write ON public.todos FOR INSERT TO authenticated WITH CHECK (auth.uid() = user_id);
         CREATE POLICY own_update ON public.todos FOR UPDATE TO authenticated USING (auth.uid() = user_id);
         CREATE POLICY own_delete ON public.todos FOR DELETE TO authenticated USING (auth.uid() = user_id);
         GRANT SELECT, INSERT, UPDATE, DELETE ON public.todos TO authenticated;
         GRANT SELECT ON public.lists TO authenticated, anon;
         INSERT INTO public.lists (name) VALUES ('home'), ('work');
         CREATE FUNCTION public.add(a int, b int) RETURNS int LANGUAGE sql AS $$ SELECT a + b $$;
         CREATE FUNCTION public.my_todos() RETURNS SETOF public.todos LANGUAGE sql STABLE
             AS $$ SELECT * FROM public.todos WHERE user_id = auth.uid() $$;
         GRANT EXECUTE ON FUNCTION public.add(int, int), public.my_todos() TO authenticated;",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rls_decides_what_each_caller_reads_and_writes() {
    let t = TestServer::start().await;
    schema(&t).await;
    let r = Rest::new(&t);
    let (_, alice) = t.sign_up("alice@example.com").await;
    let (_, bob) = t.sign_up("bob@example.com").await;
    let service = service_token();

    // Insert one and many, with the representation back.
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "todos", Some(&alice))
                .header("Prefer", "return=representation")
                .json(&json!({"title": "milk", "list_id": 1, "rank": 2})),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body[0]["title"], "milk");
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "todos?select=title", Some(&alice))
                .header("Prefer", "return=representation")
                .json(&json!([{"title": "eggs", "rank": 1}, {"title": "tea", "rank": null}])),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body, json!([{"title": "eggs"}, {"title": "tea"}]));
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "todos", Some(&bob))
                .json(&json!({"title": "bob's"})),
        )
        .await;
    assert_eq!((s, body), (StatusCode::CREATED, Value::Null));

    // Each user reads their own rows only; the service role reads all.
    let (s, headers, body) = r
        .send(r.req(
            Method::GET,
            "todos?select=title,done&order=rank.asc.nullslast",
            Some(&alice),
        ))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body,
        json!([{"title":"eggs","done":false},{"title":"milk","done":false},{"title":"tea","done":false}])
    );
    assert_eq!(headers["content-range"], "0-2/*");
    let (_, _, body) = r.send(r.req(Method::GET, "todos", Some(&bob))).await;
    assert_eq!(body.as_array().unwrap().len(), 1);
    let (_, headers, body) = r
        .send(
            r.req(Method::GET, "todos?select=id", Some(&service))
                .header("Prefer", "count=exact"),
        )
        .await;
    assert_eq!(body.as_array().unwrap().len(), 4);
    assert_eq!(headers["content-range"], "0-3/4");
    // Anonymous callers were granted nothing on todos.
    let (s, _, body) = r.send(r.req(Method::GET, "todos", None)).await;
    assert_eq!(s, 401, "{body}");
    assert_eq!(body["code"], "42501");

    // Filters, logic trees, renames, casts, ranges.
    let (_, _, body) = r
        .send(r.req(
            Method::GET,
            "todos?select=name:title,rank::text&or=(rank.eq.1,title.like.m*)&order=title",
            Some(&alice),
        ))
        .await;
    assert_eq!(
        body,
        json!([{"name":"eggs","rank":"1"},{"name":"milk","rank":"2"}])
    );
    let (_, _, body) = r
        .send(r.req(Method::GET, "todos?select=title&rank=is.null", Some(&alice)))
        .await;
    assert_eq!(body, json!([{"title":"tea"}]));
    let (_, _, body) = r
        .send(r.req(
            Method::GET,
            "todos?select=title&title=in.(tea,eggs)&rank=not.is.null",
            Some(&alice),
        ))
        .await;
    assert_eq!(body, json!([{"title":"eggs"}]));
    let (s, headers, body) = r
        .send(
            r.req(Method::GET, "todos?select=title&order=id", Some(&alice))
                .header("Range", "1-1")
                .header("Prefer", "count=exact"),
        )
        .await;
    assert_eq!(
        (s, body),
        (StatusCode::PARTIAL_CONTENT, json!([{"title":"eggs"}]))
    );
    assert_eq!(headers["content-range"], "1-1/3");

    // Embedding through the foreign key, both ways.
    let (s, _, body) = r
        .send(r.req(
            Method::GET,
            "todos?select=title,lists(name)&title=eq.milk",
            Some(&alice),
        ))
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::OK,
            json!([{"title":"milk","lists":{"name":"home"}}])
        )
    );
    let (_, _, body) = r
        .send(r.req(
            Method::GET,
            "lists?select=name,todos(title)&id=eq.1",
            Some(&alice),
        ))
        .await;
    assert_eq!(body, json!([{"name":"home","todos":[{"title":"milk"}]}]));

    // single(): exactly one row, as an object; otherwise 406.
    let object = "application/vnd.pgrst.object+json";
    let (s, _, body) = r
        .send(
            r.req(Method::GET, "todos?select=title&title=eq.tea", Some(&alice))
                .header("Accept", object),
        )
        .await;
    assert_eq!((s, body), (StatusCode::OK, json!({"title":"tea"})));
    let (s, _, body) = r
        .send(
            r.req(Method::GET, "todos?select=title", Some(&alice))
                .header("Accept", object),
        )
        .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::NOT_ACCEPTABLE, Some("PGRST116"))
    );

    // Update and delete touch the caller's rows only.
    let (s, _, body) = r
        .send(
            r.req(Method::PATCH, "todos?title=eq.bob's", Some(&alice))
                .header("Prefer", "return=representation")
                .json(&json!({"done": true})),
        )
        .await;
    assert_eq!((s, body), (StatusCode::OK, json!([])));
    let (s, _, body) = r
        .send(
            r.req(
                Method::PATCH,
                "todos?title=eq.milk&select=title,done",
                Some(&alice),
            )
            .header("Prefer", "return=representation")
            .json(&json!({"done": true})),
        )
        .await;
    assert_eq!(
        (s, body),
        (StatusCode::OK, json!([{"title":"milk","done":true}]))
    );
    let (s, _, _) = r
        .send(r.req(Method::DELETE, "todos?title=eq.tea", Some(&alice)))
        .await;
    assert_eq!(s, 204);
    let (_, _, body) = r
        .send(r.req(Method::GET, "todos?select=title&order=title", Some(&alice)))
        .await;
    assert_eq!(body, json!([{"title":"eggs"},{"title":"milk"}]));

    // A row for someone else is refused by the policy.
    let bob_id = {
        let (_, _, b) = r
            .send(r.req(Method::GET, "todos?select=user_id", Some(&bob)))
            .await;
        b[0]["user_id"].as_str().unwrap().to_owned()
    };
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "todos", Some(&alice))
                .json(&json!({"title":"x","user_id": bob_id})),
        )
        .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("42501")),
        "{body}"
    );

    // Upsert on the primary key.
    let (_, _, rows) = r
        .send(r.req(
            Method::GET,
            "todos?select=id,title&title=eq.eggs",
            Some(&alice),
        ))
        .await;
    let id = rows[0]["id"].clone();
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "todos?select=title", Some(&alice))
                .header(
                    "Prefer",
                    "resolution=merge-duplicates,return=representation",
                )
                .json(&json!([{"id": id, "title": "eggs (6)"}])),
        )
        .await;
    // `id` is GENERATED ALWAYS: PostgreSQL refuses to write it, as PostgREST would.
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("428C9")),
        "{body}"
    );

    // rpc, POST and GET, scalar and set-returning.
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "rpc/add", Some(&alice))
                .json(&json!({"a": 2, "b": 3})),
        )
        .await;
    assert_eq!((s, body), (StatusCode::OK, json!(5)));
    let (s, _, body) = r
        .send(r.req(Method::GET, "rpc/add?a=4&b=5", Some(&alice)))
        .await;
    assert_eq!((s, body), (StatusCode::OK, json!(9)));
    let (_, _, body) = r
        .send(r.req(Method::POST, "rpc/my_todos", Some(&bob)))
        .await;
    assert_eq!(body.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_postgrest_shaped_and_aethers_secrets_stay_hidden() {
    let t = TestServer::start().await;
    schema(&t).await;
    let r = Rest::new(&t);
    let (_, alice) = t.sign_up("carol@example.com").await;
    let cases: &[(Method, &str, u16, &str)] = &[
        (Method::GET, "nope", 404, "PGRST205"),
        (Method::GET, "todos?title=between.1", 400, "PGRST100"),
        (Method::GET, "todos?select=nope", 400, "42703"),
        (Method::GET, "todos?rank=eq.notanumber", 400, "22P02"),
        (Method::GET, "todos?select=title,users(id)", 400, "PGRST200"),
        (Method::POST, "rpc/nope", 404, "PGRST202"),
    ];
    for (m, path, status, code) in cases {
        let (s, _, body) = r.send(r.req(m.clone(), path, Some(&alice))).await;
        assert_eq!(
            (s.as_u16(), body["code"].as_str()),
            (*status, Some(*code)),
            "{path}: {body}"
        );
        assert!(
            body.get("message").is_some() && body.get("hint").is_some(),
            "{body}"
        );
    }
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "todos", Some(&alice))
                .json(&json!({"nope": 1})),
        )
        .await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (400, Some("PGRST204")),
        "{body}"
    );
    let (s, _, body) = r
        .send(r.req(Method::POST, "todos", Some(&alice)).body("{not json"))
        .await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (400, Some("PGRST102")),
        "{body}"
    );

    // No key at all; a valid bearer token alone is enough.
    let res = Client::new()
        .get(t.url("/rest/v1/lists"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = Client::new()
        .get(t.url("/rest/v1/lists?select=name&order=id"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!([{"name":"home"},{"name":"work"}])
    );

    // Aether's own tables: nothing for users, and no secret column even for the
    // service role; no writes through /rest/v1.
    let service = service_token();
    let (s, _, _) = r.send(r.req(Method::GET, "shares", Some(&alice))).await;
    assert_eq!(s, 403);
    let (s, _, body) = r.send(r.req(Method::GET, "shares", Some(&service))).await;
    assert_eq!(s, 200, "{body}");
    let (s, _, _) = r
        .send(r.req(Method::GET, "shares?select=token", Some(&service)))
        .await;
    assert_eq!(s, 403);
    let (s, _, body) = r
        .send(r.req(Method::GET, "auth_events?select=*", Some(&service)))
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .all(|e| e.get("ip").is_none()),
        "{body}"
    );
    let (s, _, _) = r
        .send(r.req(Method::DELETE, "files?id=not.is.null", Some(&service)))
        .await;
    assert_eq!(s, 403);
    // A read answers at most 1,000 rows; Content-Range says how many there are.
    t.exec("INSERT INTO public.lists (name) SELECT 'l' || i FROM generate_series(1, 1001) i")
        .await;
    let (s, headers, body) = r
        .send(
            r.req(Method::GET, "lists?select=id", None)
                .header("Prefer", "count=exact"),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(body.as_array().unwrap().len(), 1000);
    assert_eq!(headers["content-range"], "0-999/1003");
    // A schema that is not exposed.
    let (s, _, body) = r
        .send(
            r.req(Method::GET, "users", Some(&service))
                .header("Accept-Profile", "auth"),
        )
        .await;
    assert_eq!((s.as_u16(), body["code"].as_str()), (406, Some("PGRST106")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_return_rows_only_when_asked_and_refusals_roll_back() {
    let t = TestServer::start().await;
    schema(&t).await;
    t.exec(
        "CREATE TABLE public.contact (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, message text NOT NULL);
         GRANT INSERT ON public.contact TO anon;
         CREATE FUNCTION public.nothing() RETURNS text LANGUAGE sql AS $$ SELECT NULL::text $$;
         GRANT EXECUTE ON FUNCTION public.nothing() TO anon;",
    )
    .await;
    let r = Rest::new(&t);
    let (_, alice) = t.sign_up("dora@example.com").await;

    // An insert-only table: a plain insert works, asking for the row is refused.
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "contact", None)
                .json(&json!({"message": "hi"})),
        )
        .await;
    assert_eq!((s, body), (StatusCode::CREATED, Value::Null));
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "contact", None)
                .header("Prefer", "return=representation")
                .json(&json!({"message": "hi"})),
        )
        .await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (401, Some("42501")),
        "{body}"
    );

    // An object request touching two rows is refused and changes nothing.
    for title in ["a", "b"] {
        let (s, _, _) = r
            .send(
                r.req(Method::POST, "todos", Some(&alice))
                    .json(&json!({"title": title})),
            )
            .await;
        assert_eq!(s, 201);
    }
    let (s, _, body) = r
        .send(
            r.req(Method::PATCH, "todos", Some(&alice))
                .header("Accept", "application/vnd.pgrst.object+json")
                .header("Prefer", "return=representation")
                .json(&json!({"done": true})),
        )
        .await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (406, Some("PGRST116")),
        "{body}"
    );
    let (_, _, body) = r
        .send(r.req(Method::GET, "todos?select=done&done=is.true", Some(&alice)))
        .await;
    assert_eq!(body, json!([]), "the update was rolled back");

    // rpc returning NULL; a backwards Range; a body of unknown keys; deep nesting.
    let (s, _, body) = r.send(r.req(Method::POST, "rpc/nothing", None)).await;
    assert_eq!((s, body), (StatusCode::OK, Value::Null));
    let (s, _, body) = r
        .send(
            r.req(Method::GET, "todos", Some(&alice))
                .header("Range", "5-2"),
        )
        .await;
    assert_eq!((s.as_u16(), body["code"].as_str()), (416, Some("PGRST103")));
    let wide: serde_json::Map<String, Value> =
        (0..50_000).map(|i| (format!("k{i}"), json!(1))).collect();
    let (s, _, body) = r
        .send(
            r.req(Method::POST, "todos", Some(&alice))
                .json(&Value::Object(wide)),
        )
        .await;
    assert_eq!((s.as_u16(), body["code"].as_str()), (400, Some("PGRST204")));
    let deep = format!(
        "todos?select={}id{}",
        "todos(".repeat(2000),
        ")".repeat(2000)
    );
    let (s, _, body) = r.send(r.req(Method::GET, &deep, Some(&alice))).await;
    assert_eq!((s.as_u16(), body["code"].as_str()), (400, Some("PGRST100")));
    // A column added after the cache was loaded is found (the cache reloads on
    // a miss, at most once a second).
    t.exec("ALTER TABLE public.todos ADD COLUMN note text")
        .await;
    let found = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let (s, _, _) = r
                .send(r.req(Method::GET, "todos?select=note", Some(&alice)))
                .await;
            if s == 200 {
                return;
            }
            // The reload is rate-limited to once a second: ask again.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(found.is_ok(), "the new column was never found");
    // A name PostgreSQL would read as a function of the row is no column.
    let (s, _, body) = r
        .send(r.req(Method::GET, "todos?select=to_json", Some(&alice)))
        .await;
    assert_eq!((s.as_u16(), body["code"].as_str()), (400, Some("42703")));
}

/// The remaining PostgREST operators: `match`/`imatch`, the range operators
/// and full-text search (`fts`, `plfts`, `phfts`, `wfts`, with or without a
/// configuration), negated too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_range_and_full_text_filters() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.docs (id int PRIMARY KEY, title text, body text, days int4range, tags text[],
             tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED);
         GRANT SELECT ON public.docs TO anon;
         INSERT INTO public.docs VALUES
           (1, 'Cats', 'The cats were sleeping on the mat', '[1,5)', '{pets,cats}'),
           (2, 'Dogs', 'A dog barks at the cat', '[5,10)', '{pets,dogs}'),
           (3, 'Fish', 'Fish swim; nothing sleeps here', '[20,30)', '{water}');",
    )
    .await;
    let r = Rest::new(&t);
    let ids = |query: &'static str| {
        let r = &r;
        async move {
            let (status, _, body) = r
                .send(r.req(
                    Method::GET,
                    &format!("docs?select=id&order=id&{query}"),
                    None,
                ))
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            body.as_array()
                .unwrap()
                .iter()
                .map(|v| v["id"].as_i64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids("title=match.^[CD]").await, [1, 2]);
    assert_eq!(ids("title=imatch.^c").await, [1]);
    assert_eq!(ids("title=not.imatch.^c").await, [2, 3]);
    assert_eq!(ids("days=sl.[10,20)").await, [1, 2]);
    assert_eq!(ids("days=sr.[10,20)").await, [3]);
    assert_eq!(ids("days=adj.[5,10)").await, [1]);
    assert_eq!(ids("days=ov.[4,6)").await, [1, 2]);
    assert_eq!(ids("days=nxr.[0,6)").await, [1]);
    assert_eq!(ids("days=nxl.[5,6)").await, [2, 3]);
    assert_eq!(ids("tags=ov.{cats,water}").await, [1, 3]);
    assert_eq!(ids("body=fts(simple).cat").await, [2]);
    assert_eq!(ids("body=fts.barks").await, [2]);
    assert_eq!(ids("body=fts(english).cat").await, [1, 2]);
    assert_eq!(ids("body=plfts(english).sleeping cats").await, [1]);
    assert_eq!(ids("body=phfts(english).dog barks").await, [2]);
    assert_eq!(ids("body=wfts(english).sleep -cat").await, [3]);
    assert_eq!(ids("body=not.fts(english).cat").await, [3]);
    // A tsvector column is searched as it is (stemmed in English here).
    assert_eq!(ids("tsv=fts(simple).cat").await, [1, 2]);
    // A configuration on another operator is a parse error, as in PostgREST.
    r.refused("docs?title=eq(english).Cats", "PGRST100").await;
}

/// JSON paths in `select`, filters and `order`: `->` keeps JSON, `->>` gives
/// text; a selected path is named by its last key unless aliased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_paths_select_filter_and_order() {
    let t = TestServer::start().await;
    t.exec(
        r#"CREATE TABLE public.profiles (id int PRIMARY KEY, data jsonb);
         GRANT SELECT ON public.profiles TO anon;
         INSERT INTO public.profiles VALUES
           (1, '{"name": "Ann", "age": 31, "tags": ["a", "b"], "address": {"city": "Oslo"}}'),
           (2, '{"name": "Bob", "age": 25, "tags": ["c"], "address": {"city": "Rome"}}'),
           (3, '{"name": "Cy''s", "age": 40, "address": {"city": "Oslo"}}');"#,
    )
    .await;
    let r = Rest::new(&t);
    let get = |query: &'static str| {
        let r = &r;
        async move {
            let (status, _, body) = r
                .send(r.req(Method::GET, &format!("profiles?{query}"), None))
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            body
        }
    };
    assert_eq!(
        get("select=id,data->>name,city:data->address->>city,data->tags->0&order=id").await,
        json!([
            {"id": 1, "name": "Ann", "city": "Oslo", "0": "a"},
            {"id": 2, "name": "Bob", "city": "Rome", "0": "c"},
            {"id": 3, "name": "Cy's", "city": "Oslo", "0": null}
        ])
    );
    assert_eq!(
        get("select=id&data->address->>city=eq.Oslo&order=data->>age.desc").await,
        json!([{"id": 3}, {"id": 1}])
    );
    assert_eq!(
        get("select=id&data->>name=eq.Cy's").await,
        json!([{"id": 3}])
    );
    assert_eq!(
        get("select=age:data->age::int&data->age=gt.30&order=id").await,
        json!([{"age": 31}, {"age": 40}])
    );
    // The column before the path must exist.
    r.refused("profiles?nope->>a=eq.1", "42703").await;
    // An empty key is a parse error.
    r.refused("profiles?select=data->", "PGRST100").await;
}

/// Authors and their books (a one-to-many key), for the embedding tests.
const LIBRARY: &str = "CREATE TABLE public.authors (id int PRIMARY KEY, name text);
     CREATE TABLE public.books (id int PRIMARY KEY, author_id int REFERENCES public.authors, title text, year int);
     GRANT SELECT ON public.authors, public.books TO anon;
     INSERT INTO public.authors VALUES (1, 'Ann'), (2, 'Bob'), (3, 'Cy');
     INSERT INTO public.books VALUES
       (1, 1, 'Old', 1990), (2, 1, 'New', 2010), (3, 1, 'Newer', 2020),
       (4, 2, 'Older', 1980);";

/// `...table(columns)` (PostgREST's spread): the embedded columns become the
/// row's own, values for a to-one relationship and arrays for a to-many one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spread_embed_puts_its_columns_in_the_row() {
    let t = TestServer::start().await;
    t.exec(LIBRARY).await;
    t.exec(
        "INSERT INTO public.books VALUES (5, NULL, 'Anonymous', 1900);
         CREATE TABLE public.bios (author_id int PRIMARY KEY REFERENCES public.authors, bio text);
         GRANT SELECT ON public.bios TO anon;
         INSERT INTO public.bios VALUES (1, 'Wrote');
         CREATE TABLE public.agents (id int PRIMARY KEY, author_id int UNIQUE REFERENCES public.authors, agent text);
         GRANT SELECT ON public.agents TO anon;
         INSERT INTO public.agents VALUES (10, 2, 'Dee');",
    )
    .await;
    let r = Rest::new(&t);
    // One-to-one (the key pointing back is the bio's primary key): a value,
    // and a plain embed of it an object, as PostgREST has them.
    let body = r.get_ok("authors?select=name,...bios(bio)&order=id").await;
    assert_eq!(
        body,
        json!([
            {"name": "Ann", "bio": "Wrote"},
            {"name": "Bob", "bio": null},
            {"name": "Cy", "bio": null}
        ])
    );
    let body = r.get_ok("authors?select=name,bios(bio)&id=eq.1").await;
    assert_eq!(body, json!([{"name": "Ann", "bios": {"bio": "Wrote"}}]));
    // A unique key pointing back is one-to-one too.
    let body = r
        .get_ok("authors?select=name,agents(agent),...agents(agent)&id=in.(1,2)&order=id")
        .await;
    assert_eq!(
        body,
        json!([
            {"name": "Ann", "agents": null, "agent": null},
            {"name": "Bob", "agents": {"agent": "Dee"}, "agent": "Dee"}
        ])
    );
    // To-one: the author's columns are the book's, null without an author.
    let body = r
        .get_ok("books?select=title,...authors(author:name)&id=in.(1,4,5)&order=id")
        .await;
    assert_eq!(
        body,
        json!([
            {"title": "Old", "author": "Ann"},
            {"title": "Older", "author": "Bob"},
            {"title": "Anonymous", "author": null}
        ])
    );
    // To-many: each column an array of the rows' values, in the embed's order.
    let body = r
        .get_ok("authors?select=name,...books(title,year)&books.order=year.desc&order=id")
        .await;
    assert_eq!(
        body,
        json!([
            {"name": "Ann", "title": ["Newer", "New", "Old"], "year": [2020, 2010, 1990]},
            {"name": "Bob", "title": ["Older"], "year": [1980]},
            {"name": "Cy", "title": [], "year": []}
        ])
    );
    // `!inner` with the spread resource's filter; its own embeds stay objects.
    let body = r
        .get_ok("books?select=title,...authors!inner(name,books(count))&authors.name=eq.Bob")
        .await;
    assert_eq!(
        body,
        json!([{"title": "Older", "name": "Bob", "books": [{"count": 1}]}])
    );
    // A spread count is a number; a counted request counts the rows it reads.
    let (status, headers, body) = r
        .send(
            r.req(
                Method::GET,
                "authors?select=name,...books(count)&order=id",
                None,
            )
            .header("Prefer", "count=exact"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!([
            {"name": "Ann", "count": 3},
            {"name": "Bob", "count": 1},
            {"name": "Cy", "count": 0}
        ])
    );
    assert_eq!(headers["content-range"], "0-2/3");
    // A spread has no name of its own to alias; only embeds spread.
    r.refused("books?select=title,...a:authors(name)", "PGRST100")
        .await;
    r.refused("books?select=...title", "PGRST100").await;
    r.refused("books?select=......authors(name)", "PGRST100")
        .await;
}

/// Filters, order and limit on an embedded resource (`books.year=gt.2000`),
/// and `!inner`, which keeps only the rows that have a matching embedded row
/// (in the count too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_resources_take_filters_order_limit_and_inner() {
    let t = TestServer::start().await;
    t.exec(LIBRARY).await;
    let r = Rest::new(&t);
    let get = |query: &'static str| {
        let r = &r;
        async move {
            let (status, headers, body) = r
                .send(
                    r.req(Method::GET, &format!("authors?{query}"), None)
                        .header("Prefer", "count=exact"),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            let range = headers
                .get("content-range")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (body, range)
        }
    };
    let (body, _) = get(
        "select=name,books(title)&books.year=gt.2000&books.order=year.desc&books.limit=1&order=id",
    )
    .await;
    assert_eq!(
        body,
        json!([
            {"name": "Ann", "books": [{"title": "Newer"}]},
            {"name": "Bob", "books": []},
            {"name": "Cy", "books": []}
        ])
    );
    let (body, range) = get("select=name,books!inner(title)&books.year=lt.2000&order=id").await;
    assert_eq!(
        body,
        json!([
            {"name": "Ann", "books": [{"title": "Old"}]},
            {"name": "Bob", "books": [{"title": "Older"}]}
        ])
    );
    assert_eq!(range, "0-1/2");
    let (body, _) =
        get("select=name,works:books!inner(title)&works.or=(title.eq.New,title.eq.Older)&order=id")
            .await;
    assert_eq!(
        body,
        json!([
            {"name": "Ann", "works": [{"title": "New"}]},
            {"name": "Bob", "works": [{"title": "Older"}]}
        ])
    );
    // Embeds nest: each book's author, with that author's other books.
    let (status, _, body) = r
        .send(r.req(
            Method::GET,
            "books?select=title,authors(name,books(title))&id=eq.4",
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!([{"title": "Older", "authors": {"name": "Bob", "books": [{"title": "Older"}]}}])
    );
    // `!inner` below the first level narrows its parent embed's rows: Ann's
    // books that have a review.
    t.exec(
        "CREATE TABLE public.reviews (id int PRIMARY KEY, book_id int REFERENCES public.books, stars int);
         GRANT SELECT ON public.reviews TO anon;
         INSERT INTO public.reviews VALUES (1, 2, 5);",
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    let body = loop {
        let (status, _, body) = r
            .send(r.req(
                Method::GET,
                "authors?select=name,books(title,reviews!inner(stars))&id=eq.1",
                None,
            ))
            .await;
        // The new table reaches the schema cache through the DDL listener.
        if status == StatusCode::OK || std::time::Instant::now() > deadline {
            assert_eq!(status, StatusCode::OK, "{body}");
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        body,
        json!([{"name": "Ann", "books": [{"title": "New", "reviews": [{"stars": 5}]}]}])
    );
    // Filters, order and paging below the first level (supabase-js's
    // `referencedTable: 'books.reviews'`): each book's best review of at
    // least 3 stars; `!inner` there keeps only the books that have one.
    t.exec("INSERT INTO public.reviews VALUES (2, 2, 3), (3, 2, 1), (4, 3, 4), (5, 1, 2);")
        .await;
    let body = r
        .get_ok(
            "authors?select=name,books(title,reviews(stars))&id=eq.1&books.order=id\
             &books.reviews.stars=gte.3&books.reviews.order=stars.asc&books.reviews.limit=1",
        )
        .await;
    assert_eq!(
        body,
        json!([{"name": "Ann", "books": [
            {"title": "Old", "reviews": []},
            {"title": "New", "reviews": [{"stars": 3}]},
            {"title": "Newer", "reviews": [{"stars": 4}]}
        ]}])
    );
    let body = r
        .get_ok(
            "authors?select=name,books(title,reviews!inner(stars))&id=eq.1&books.order=id\
             &books.reviews.or=(stars.eq.1,stars.eq.4)&books.reviews.order=stars.desc",
        )
        .await;
    assert_eq!(
        body,
        json!([{"name": "Ann", "books": [
            {"title": "New", "reviews": [{"stars": 1}]},
            {"title": "Newer", "reviews": [{"stars": 4}]}
        ]}])
    );
    // Counted: only `!inner` conditions go into the count, at every level.
    let (body, range) = get(
        "select=name,books!inner(title,reviews(stars))&books.reviews.stars=gte.3\
         &books.reviews.limit=1&books.reviews.order=stars.desc&order=id&books.order=id",
    )
    .await;
    assert_eq!(range, "0-1/2", "{body}");
    assert_eq!(
        body[0]["books"][1],
        json!({"title": "New", "reviews": [{"stars": 5}]})
    );
    let (_, range) =
        get("select=name,books!inner(title,reviews!inner(stars))&books.reviews.stars=gte.4").await;
    assert_eq!(
        range, "0-0/1",
        "only Ann has a book with a review of 4 or more"
    );
    // `books(count)`: how many rows match, filters applied, aliased or not.
    let (body, _) = get("select=name,books(count)&order=id").await;
    assert_eq!(
        body,
        json!([
            {"name": "Ann", "books": [{"count": 3}]},
            {"name": "Bob", "books": [{"count": 1}]},
            {"name": "Cy", "books": [{"count": 0}]}
        ])
    );
    let (body, range) =
        get("select=name,books!inner(n:count)&books.year=gt.2000&books.limit=1&order=id").await;
    assert_eq!(body, json!([{"name": "Ann", "books": [{"n": 2}]}]));
    assert_eq!(range, "0-0/1");
    let body = r.get_ok("books?select=title,authors(count)&id=eq.4").await;
    assert_eq!(body, json!([{"title": "Older", "authors": {"count": 1}}]));
    // An embedded resource's unknown column is 42703 before any SQL: it is
    // not read as a function of the whole row (`to_json(_e1)`).
    r.refused("authors?select=name,books(to_json)", "42703")
        .await;
    r.refused(
        "authors?select=name,books(title)&books.to_json=eq.x",
        "42703",
    )
    .await;
    r.refused(
        "authors?select=name,books(title)&books.order=row_to_json",
        "42703",
    )
    .await;
    r.refused(
        "authors?select=name,books(count)&books.reviews.stars=gt.1",
        "PGRST108",
    )
    .await;
    // A second-level name the select does not embed there.
    r.refused(
        "authors?select=name,books(title)&books.reviews.stars=gt.1",
        "PGRST108",
    )
    .await;
    // Order and paging given for a to-one embed bind nothing.
    let (status, _, body) = r
        .send(r.req(
            Method::GET,
            "books?select=title,authors(name)&authors.limit=1&authors.order=name&id=eq.4",
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!([{"title": "Older", "authors": {"name": "Bob"}}])
    );
    // A filter on a resource the select does not embed.
    r.refused("authors?select=name&books.year=gt.1", "PGRST108")
        .await;
}

/// DDL reaches the schema cache through the event trigger (migration 0015):
/// a column granted a moment ago is in `select=*` at once, though no request
/// missed the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_reaches_the_schema_cache_without_a_miss() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.cards (id int PRIMARY KEY, front text, back text);
         GRANT SELECT (id, front) ON public.cards TO anon;
         INSERT INTO public.cards VALUES (1, 'question', 'answer');",
    )
    .await;
    let r = Rest::new(&t);
    let star = || async {
        let (status, _, body) = r.send(r.req(Method::GET, "cards?select=*", None)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    };
    // The first request loads the cache, after the DDL above.
    let deadline = std::time::Instant::now() + WAIT;
    while star().await != json!([{"id": 1, "front": "question"}]) {
        assert!(
            std::time::Instant::now() < deadline,
            "never settled: {}",
            star().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    t.exec("GRANT SELECT (back) ON public.cards TO anon").await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let body = star().await;
        if body == json!([{"id": 1, "front": "question", "back": "answer"}]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new grant never showed: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `Prefer: count=planned` is the planner's estimate; `count=estimated` is
/// exact while the estimate is small and the estimate past the row limit, as
/// PostgREST. Statistics left stale on purpose tell the three apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_and_estimated_counts() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.events (id int PRIMARY KEY, kind text) WITH (autovacuum_enabled = false);
         GRANT SELECT ON public.events TO anon;
         INSERT INTO public.events SELECT i, CASE WHEN i % 500 = 0 THEN 'rare' ELSE 'common' END
           FROM generate_series(1, 5000) i;
         ANALYZE public.events;
         DELETE FROM public.events WHERE kind = 'common';",
    )
    .await;
    let r = Rest::new(&t);
    let total = |query: &'static str, count: &'static str| {
        let r = &r;
        async move {
            let (status, headers, body) = r
                .send(
                    r.req(Method::GET, &format!("events?select=id&{query}"), None)
                        .header("Prefer", format!("count={count}"))
                        .header("Range", "0-0"),
                )
                .await;
            assert!(status.is_success(), "{query}: {body}");
            let range = headers["content-range"].to_str().unwrap().to_owned();
            range.rsplit('/').next().unwrap().parse::<i64>().unwrap()
        }
    };
    assert_eq!(total("", "exact").await, 10);
    // The statistics still say 5,000 rows.
    let planned = total("", "planned").await;
    assert!(planned > 1000, "{planned}");
    // Past the row limit the estimate stands; below it, the exact count.
    assert_eq!(total("", "estimated").await, planned);
    assert_eq!(total("kind=eq.rare", "estimated").await, 10);
}

/// `Prefer: tx=rollback`: the answer of the write, and nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_rollback_answers_and_keeps_nothing() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.notes (id int PRIMARY KEY, body text);
         GRANT SELECT, INSERT, UPDATE ON public.notes TO anon;
         INSERT INTO public.notes VALUES (1, 'kept');",
    )
    .await;
    let r = Rest::new(&t);
    let (status, headers, body) = r
        .send(
            r.req(Method::POST, "notes", None)
                .header("Prefer", "return=representation, tx=rollback")
                .json(&json!({"id": 2, "body": "tried"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body, json!([{"id": 2, "body": "tried"}]));
    assert_eq!(headers["preference-applied"], "tx=rollback");
    let (status, _, body) = r
        .send(
            r.req(Method::PATCH, "notes?id=eq.1", None)
                .header("Prefer", "tx=rollback")
                .json(&json!({"body": "changed"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, _, body) = r
        .send(r.req(Method::GET, "notes?select=id,body&order=id", None))
        .await;
    assert_eq!(body, json!([{"id": 1, "body": "kept"}]));
}

/// `GET /rest/v1/`: PostgREST's OpenAPI description, of what the caller may
/// read: anon sees the table granted to it, with its readable columns and
/// their types; not the table granted to no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_is_an_openapi_description_of_what_the_caller_may_read() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.items (id bigint PRIMARY KEY, name text NOT NULL, tags text[], secret text);
         CREATE TABLE public.hidden (id int PRIMARY KEY);
         GRANT SELECT (id, name, tags) ON public.items TO anon;",
    )
    .await;
    let r = Rest::new(&t);
    let (status, headers, doc) = r.send(r.req(Method::GET, "", None)).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openapi+json")
    );
    assert_eq!(doc["swagger"], "2.0");
    assert_eq!(doc["basePath"], "/rest/v1");
    assert!(doc["paths"]["/items"]["get"].is_object(), "{doc}");
    assert!(doc["paths"].get("/hidden").is_none(), "{doc}");
    let items = &doc["definitions"]["items"];
    assert_eq!(items["required"], json!(["id", "name"]));
    assert_eq!(items["properties"]["id"]["type"], "integer");
    assert_eq!(items["properties"]["name"]["type"], "string");
    assert_eq!(items["properties"]["tags"]["type"], "array");
    assert!(items["properties"].get("secret").is_none(), "{items}");
}

/// `Prefer: missing=default` (supabase-js `insert(rows, { defaultToNull:
/// false })`, which sends the rows' keys as `columns`): a key a row lacks
/// takes the column's default, computed for that row (an identity,
/// `auth.uid()`, `gen_random_uuid()`), where PostgREST's default is NULL; a
/// key given as `null` stays NULL; an upsert's update takes what the insert
/// would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_take_their_defaults_when_asked() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.items (
             id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
             name text,
             note text DEFAULT 'none',
             made_by uuid DEFAULT auth.uid(),
             tag uuid DEFAULT gen_random_uuid());
         GRANT SELECT, INSERT, UPDATE ON public.items TO authenticated;",
    )
    .await;
    let uid = user(&t.sql, "defaults@rest.test").await;
    let token = user_token(&uid);
    let r = Rest::new(&t);
    let post = |query: &str, prefer: &str, rows: Value| {
        r.req(Method::POST, &format!("items?{query}"), Some(&token))
            .header("Prefer", prefer)
            .json(&rows)
    };
    let (status, _, body) = r
        .send(post(
            "columns=name,note,made_by",
            "return=representation, missing=default",
            json!([{"name": "a"}, {"name": "b", "note": null}, {"note": "given"}]),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let rows = body.as_array().unwrap();
    let got: Vec<(Value, Value, Value, Value)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].clone(),
                r["name"].clone(),
                r["note"].clone(),
                r["made_by"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (json!(1), json!("a"), json!("none"), json!(uid)),
            (json!(2), json!("b"), Value::Null, json!(uid)),
            (json!(3), Value::Null, json!("given"), json!(uid)),
        ]
    );
    let tags: std::collections::HashSet<&str> =
        rows.iter().filter_map(|r| r["tag"].as_str()).collect();
    assert_eq!(tags.len(), 3, "a default computed per row: {body}");

    // Without the preference a missing key is NULL, as on PostgREST.
    let (status, _, body) = r
        .send(post(
            "columns=name,note",
            "return=representation",
            json!([{"name": "d"}, {"name": "e", "note": "x"}]),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        (&body[0]["note"], &body[1]["note"]),
        (&Value::Null, &json!("x"))
    );

    // An upsert: the updated row takes the defaults the insert would have.
    let (status, _, body) = r
        .send(post(
            "columns=id,name,note&on_conflict=id",
            "return=representation, resolution=merge-duplicates, missing=default",
            json!([{"id": 2, "name": "b2"}, {"id": 40, "note": "new"}]),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["id"].clone(), r["name"].clone(), r["note"].clone()))
            .collect::<Vec<_>>(),
        [
            (json!(2), json!("b2"), json!("none")),
            (json!(40), Value::Null, json!("new"))
        ]
    );
    // A column named twice is named once.
    let (status, _, body) = r
        .send(post(
            "columns=name,name,note",
            "return=representation, missing=default",
            json!([{"name": "g"}]),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        (&body[0]["name"], &body[0]["note"]),
        (&json!("g"), &json!("none"))
    );
    // At most 10,000 rows take defaults at once.
    let many = vec![json!({}); 10_001];
    let (status, _, body) = r
        .send(post("columns=name", "missing=default", Value::Array(many)))
        .await;
    assert_eq!(
        (status, &body["code"]),
        (StatusCode::BAD_REQUEST, &json!("PGRST102")),
        "{body}"
    );
    // Not every element an object: refused, nothing written.
    let (status, _, body) = r
        .send(post(
            "columns=name",
            "missing=default",
            json!([{"name": "f"}, 5]),
        ))
        .await;
    assert_eq!(
        (status, &body["code"]),
        (StatusCode::BAD_REQUEST, &json!("PGRST102")),
        "{body}"
    );
}

/// A function's error takes PostgREST's status for its SQLSTATE, and
/// `PTxyz` sets the status `xyz` (how a function answers 402, say).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_functions_sqlstate_decides_the_status() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE FUNCTION public.fail(code text) RETURNS void LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'failed on purpose' USING ERRCODE = code; END $$;
         GRANT EXECUTE ON FUNCTION public.fail(text) TO anon;",
    )
    .await;
    let r = Rest::new(&t);
    let deadline = std::time::Instant::now() + WAIT;
    for (code, status) in [
        ("PT402", 402),
        ("25006", 405),
        ("53300", 503),
        ("28000", 403),
        ("P0001", 400),
        ("40001", 500),
    ] {
        let (got, body) = loop {
            let (got, _, body) = r
                .send(
                    r.req(Method::POST, "rpc/fail", None)
                        .json(&json!({ "code": code })),
                )
                .await;
            // The new function reaches the schema cache through the DDL listener.
            if got != StatusCode::NOT_FOUND || std::time::Instant::now() > deadline {
                break (got, body);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(got.as_u16(), status, "{code}: {body}");
        assert_eq!(body["code"], json!(code));
        assert_eq!(body["message"], json!("failed on purpose"));
    }
}
