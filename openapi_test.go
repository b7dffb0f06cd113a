package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"mime"
	"net/http"
	"net/url"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The OpenAPI tests hold openapi.json to the server: the same routes as the mux, the
// documented auth, and real answers that have every documented field and no other. The
// document is read as plain JSON (jsonObj); oaValidate understands the JSON Schema
// keywords in oaKeywords and the document may use no other.

// jsonObj is a JSON object as encoding/json decodes it.
type jsonObj = map[string]any

// oaMethods are the operations a path item may hold, as OpenAPI spells them.
var oaMethods = []string{"get", "put", "post", "delete", "options", "head", "patch", "trace"}

// oaKeywords are the schema keywords oaValidate checks or that only annotate.
var oaKeywords = map[string]bool{
	"$ref": true, "type": true, "enum": true, "properties": true, "required": true,
	"additionalProperties": true, "items": true, "pattern": true, "minimum": true, "maximum": true,
	"minItems": true, "maxItems": true, "minLength": true, "maxLength": true,
	"format": true, "description": true, "default": true,
}

// oaDoc decodes the embedded document.
func oaDoc(t testing.TB) jsonObj {
	t.Helper()
	var doc jsonObj
	dec := json.NewDecoder(bytes.NewReader(openAPIDocument))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("openapi.json: got %v; want JSON", err)
	}
	return doc
}

// oaResolve follows a local $ref ("#/components/…") until it reaches a node that is not one.
func oaResolve(t testing.TB, doc jsonObj, node jsonObj) jsonObj {
	t.Helper()
	for range 10 {
		ref, ok := node["$ref"].(string)
		if !ok {
			return node
		}
		var cur any = doc
		for _, part := range strings.Split(strings.TrimPrefix(ref, "#/"), "/") {
			m, _ := cur.(jsonObj)
			cur = m[part]
		}
		next, ok := cur.(jsonObj)
		if !ok || !strings.HasPrefix(ref, "#/") {
			t.Fatalf("openapi.json: got $ref %q that resolves to nothing; want a local object", ref)
		}
		node = next
	}
	t.Fatalf("openapi.json: got a $ref chain over 10 long; want a short one")
	return nil
}

// oaOperation is one documented method and path.
type oaOperation struct {
	method, path string // "GET", "/v1/workspaces/{ws}"
	op           jsonObj
	params       []jsonObj // the path item's and the operation's, resolved
}

// oaOperations lists every operation of the document, sorted.
func oaOperations(t testing.TB, doc jsonObj) []oaOperation {
	t.Helper()
	var ops []oaOperation
	paths, _ := doc["paths"].(jsonObj)
	for path, item := range paths {
		item := item.(jsonObj)
		var shared []jsonObj
		for _, p := range asList(item["parameters"]) {
			shared = append(shared, oaResolve(t, doc, p.(jsonObj)))
		}
		for _, m := range oaMethods {
			op, ok := item[m].(jsonObj)
			if !ok {
				continue
			}
			params := slices.Clone(shared)
			for _, p := range asList(op["parameters"]) {
				params = append(params, oaResolve(t, doc, p.(jsonObj)))
			}
			ops = append(ops, oaOperation{strings.ToUpper(m), path, op, params})
		}
	}
	sort.Slice(ops, func(i, j int) bool { return ops[i].path+ops[i].method < ops[j].path+ops[j].method })
	return ops
}

// asList is v as a JSON array; nil when it is not one.
func asList(v any) []any {
	l, _ := v.([]any)
	return l
}

// key is how the tests name an operation: "GET /v1/workspaces/{ws}".
func (o oaOperation) key() string { return o.method + " " + o.path }

// securedBy lists the security schemes any one of which lets a caller in; none: anyone.
func (o oaOperation) securedBy() []string {
	var schemes []string
	for _, req := range asList(o.op["security"]) {
		for name := range req.(jsonObj) {
			schemes = append(schemes, name)
		}
	}
	sort.Strings(schemes)
	return schemes
}

// wildcard matches a path pattern's wildcards: {name} and {name...}.
var wildcard = regexp.MustCompile(`\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}`)

// TestOpenAPIMatchesMux: the document is OpenAPI 3.1 JSON; its paths and methods are
// exactly the patterns handler() registers; every path parameter is declared, every $ref
// resolves, every schema uses only keywords oaValidate understands, and every operation
// documents a success, the error format for its errors, and 401 when it needs a token.
func TestOpenAPIMatchesMux(t *testing.T) {
	doc := oaDoc(t)
	if v := doc["openapi"]; v != "3.1.0" {
		t.Errorf("openapi: got %v; want 3.1.0", v)
	}
	s := &server{log: testLogger(t)}
	s.handler()
	served := map[string]bool{}
	for _, p := range s.routes {
		method, path, ok := strings.Cut(p, " ")
		if !ok {
			t.Errorf("route %q: got no method; want one (the document lists each method)", p)
			continue
		}
		served[method+" "+wildcard.ReplaceAllString(path, "{$1}")] = true
	}
	documented := map[string]bool{}
	ids := map[string]string{}
	for _, o := range oaOperations(t, doc) {
		documented[o.key()] = true
		id, _ := o.op["operationId"].(string)
		if prev, dup := ids[id]; dup || id == "" {
			t.Errorf("%s: got operationId %q (also on %q); want a unique one", o.key(), id, prev)
		}
		ids[id] = o.key()
		oaCheckOperation(t, doc, o)
	}
	for k := range served {
		if !documented[k] {
			t.Errorf("route %s: got it served but not in openapi.json; want it documented", k)
		}
	}
	for k := range documented {
		if !served[k] {
			t.Errorf("openapi.json %s: got it documented but not served; want a route", k)
		}
	}
	if len(served) < 10 {
		t.Errorf("routes: got %d recorded; want every route handler() registers", len(served))
	}
	oaWalkSchemas(t, doc["paths"], "#/paths")
	oaWalkSchemas(t, doc["components"], "#/components")
	components, _ := doc["components"].(jsonObj)
	schemas, _ := components["schemas"].(jsonObj)
	for name, s := range schemas {
		oaCheckSchema(t, s, "#/components/schemas/"+name)
	}
}

// oaNotErrors are the answers of status 400 or more that are not in the error format.
var oaNotErrors = map[string]bool{
	"GET /readyz 503": true, // not ready is the readiness report, saying what is down
}

// oaCheckOperation checks one operation's parameters and responses.
func oaCheckOperation(t *testing.T, doc jsonObj, o oaOperation) {
	t.Helper()
	inPath := map[string]bool{}
	for _, m := range wildcard.FindAllStringSubmatch(o.path, -1) {
		inPath[m[1]] = true
	}
	declared := map[string]bool{}
	for _, p := range o.params {
		if p["in"] == "path" {
			declared[p["name"].(string)] = true
			if p["required"] != true {
				t.Errorf("%s: got path parameter %v not required; want required", o.key(), p["name"])
			}
		}
	}
	if !reflect.DeepEqual(inPath, declared) {
		t.Errorf("%s: got path parameters %v declared; want %v, as in the path", o.key(), declared, inPath)
	}
	responses, _ := o.op["responses"].(jsonObj)
	success := false
	for code, r := range responses {
		r := oaResolve(t, doc, r.(jsonObj))
		n, err := strconv.Atoi(code)
		if err != nil {
			t.Errorf("%s: got response %q; want a status code", o.key(), code)
			continue
		}
		success = success || n < 300
		if n >= 400 && !oaNotErrors[o.key()+" "+code] {
			schema := oaResolve(t, doc, oaMedia(r, "application/json"))
			if !reflect.DeepEqual(schema, oaResolve(t, doc, jsonObj{"$ref": "#/components/schemas/Error"})) {
				t.Errorf("%s %s: got schema %v; want the Error format", o.key(), code, schema)
			}
		}
	}
	if !success {
		t.Errorf("%s: got no 2xx response; want one", o.key())
	}
	if _, ok := responses["401"]; ok != (len(o.securedBy()) > 0) {
		t.Errorf("%s: got 401 documented %v with security %v; want it exactly when a token is needed", o.key(), ok, o.securedBy())
	}
}

// oaMedia returns the schema of a response's media type, or nil.
func oaMedia(r jsonObj, mediaType string) jsonObj {
	content, _ := r["content"].(jsonObj)
	m, _ := content[mediaType].(jsonObj)
	s, _ := m["schema"].(jsonObj)
	return s
}

// oaWalkSchemas checks every schema under node (the value of each "schema" key) with
// oaCheckSchema.
func oaWalkSchemas(t *testing.T, node any, where string) {
	t.Helper()
	switch n := node.(type) {
	case []any:
		for i, v := range n {
			oaWalkSchemas(t, v, fmt.Sprintf("%s/%d", where, i))
		}
	case jsonObj:
		for k, v := range n {
			if k == "schema" {
				oaCheckSchema(t, v, where+"/"+k)
			} else {
				oaWalkSchemas(t, v, where+"/"+k)
			}
		}
	}
}

// oaCheckSchema fails the test for a keyword of schema s, or of the schemas inside it,
// that oaKeywords lacks: oaValidate would silently ignore it.
func oaCheckSchema(t *testing.T, s any, where string) {
	t.Helper()
	m, ok := s.(jsonObj)
	if !ok {
		t.Errorf("%s: got schema %v; want an object", where, s)
		return
	}
	for k, v := range m {
		switch {
		case !oaKeywords[k]:
			t.Errorf("%s: got schema keyword %q; want one of oaKeywords (teach oaValidate first)", where, k)
		case k == "properties":
			props, _ := v.(jsonObj)
			for name, p := range props {
				oaCheckSchema(t, p, where+"/properties/"+name)
			}
		case k == "items" || (k == "additionalProperties" && v != false):
			oaCheckSchema(t, v, where+"/"+k)
		}
	}
}

// oaValidate returns what in v does not match schema s: a wrong type, a value outside
// its enum, range, length or pattern, a required property missing, an undocumented one
// where additionalProperties is false.
func oaValidate(t testing.TB, doc jsonObj, s jsonObj, v any, where string) []string {
	t.Helper()
	s = oaResolve(t, doc, s)
	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, where+": "+fmt.Sprintf(format, args...))
	}
	if types := oaTypes(s["type"]); len(types) > 0 && !slices.Contains(types, oaTypeOf(v)) &&
		!(oaTypeOf(v) == "integer" && slices.Contains(types, "number")) {
		bad("got %s %s; want %v", oaTypeOf(v), oaShort(v), types)
		return problems
	}
	if enum := asList(s["enum"]); enum != nil && !slices.ContainsFunc(enum, func(e any) bool { return reflect.DeepEqual(e, v) }) {
		bad("got %s; want one of %v", oaShort(v), enum)
	}
	switch x := v.(type) {
	case string:
		if p, ok := s["pattern"].(string); ok && !regexp.MustCompile(p).MatchString(x) {
			bad("got %q; want it to match %s", x, p)
		}
		if n := len([]rune(x)); oaOut(float64(n), s["minLength"], s["maxLength"]) {
			bad("got length %d; want %v … %v", n, s["minLength"], s["maxLength"])
		}
	case json.Number:
		if f, _ := x.Float64(); oaOut(f, s["minimum"], s["maximum"]) {
			bad("got %s; want %v … %v", x, s["minimum"], s["maximum"])
		}
	case []any:
		if oaOut(float64(len(x)), s["minItems"], s["maxItems"]) {
			bad("got %d items; want %v … %v", len(x), s["minItems"], s["maxItems"])
		}
		if items, ok := s["items"].(jsonObj); ok {
			for i, e := range x {
				problems = append(problems, oaValidate(t, doc, items, e, fmt.Sprintf("%s[%d]", where, i))...)
			}
		}
	case jsonObj:
		for _, r := range asList(s["required"]) {
			if _, ok := x[r.(string)]; !ok {
				bad("got no %q; want it (required)", r)
			}
		}
		props, _ := s["properties"].(jsonObj)
		for k, e := range x {
			switch ps, ok := props[k].(jsonObj); {
			case ok:
				problems = append(problems, oaValidate(t, doc, ps, e, where+"."+k)...)
			case s["additionalProperties"] == false:
				bad("got %q; want only the documented properties %v", k, slices.Sorted(maps.Keys(props)))
			}
		}
	}
	return problems
}

// oaTypes is a schema's type keyword as a list.
func oaTypes(v any) []string {
	switch x := v.(type) {
	case string:
		return []string{x}
	case []any:
		var l []string
		for _, e := range x {
			l = append(l, e.(string))
		}
		return l
	}
	return nil
}

// oaTypeOf is the JSON Schema type of a decoded value.
func oaTypeOf(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case json.Number:
		if _, err := x.Int64(); err == nil {
			return "integer"
		}
		return "number"
	case []any:
		return "array"
	case jsonObj:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

// oaOut reports whether n is below lo or above hi (either may be absent).
func oaOut(n float64, lo, hi any) bool {
	if l, ok := lo.(json.Number); ok {
		if f, _ := l.Float64(); n < f {
			return true
		}
	}
	if h, ok := hi.(json.Number); ok {
		if f, _ := h.Float64(); n > f {
			return true
		}
	}
	return false
}

// oaShort is v in JSON, cut short for messages.
func oaShort(v any) string {
	b, _ := json.Marshal(v)
	if len(b) > 80 {
		return string(b[:77]) + "..."
	}
	return string(b)
}

// oaChecker checks real answers against the document and remembers which operations had
// a success answer checked.
type oaChecker struct {
	doc     jsonObj
	ops     map[string]oaOperation
	checked map[string]bool
}

// newOAChecker reads the document for checking answers.
func newOAChecker(t testing.TB) *oaChecker {
	c := &oaChecker{doc: oaDoc(t), ops: map[string]oaOperation{}, checked: map[string]bool{}}
	for _, o := range oaOperations(t, c.doc) {
		c.ops[o.key()] = o
	}
	return c
}

// check fails the test unless the answer (status, Content-Type, body) is one the document
// gives for the operation "METHOD /path/{template}".
func (c *oaChecker) check(t testing.TB, op string, status int, h http.Header, body []byte) {
	t.Helper()
	o, ok := c.ops[op]
	if !ok {
		t.Fatalf("%s: got no such operation in openapi.json; want it documented", op)
	}
	responses, _ := o.op["responses"].(jsonObj)
	r, ok := responses[strconv.Itoa(status)].(jsonObj)
	if !ok {
		t.Errorf("%s: got status %d (%s); want one of the documented %v", op, status, body, slices.Sorted(maps.Keys(responses)))
		return
	}
	r = oaResolve(t, c.doc, r)
	mediaType, _, _ := mime.ParseMediaType(h.Get("Content-Type"))
	content, _ := r["content"].(jsonObj)
	var schema jsonObj
	for mt, m := range content {
		if documented, _, _ := mime.ParseMediaType(mt); documented == mediaType {
			schema, _ = m.(jsonObj)["schema"].(jsonObj)
		}
	}
	if schema == nil {
		t.Errorf("%s %d: got Content-Type %q; want one of the documented %v", op, status, h.Get("Content-Type"), slices.Sorted(maps.Keys(content)))
		return
	}
	if mediaType == "application/json" {
		var v any
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.UseNumber()
		if err := dec.Decode(&v); err != nil {
			t.Errorf("%s %d: got body %s (%v); want JSON", op, status, body, err)
			return
		}
		for _, p := range oaValidate(t, c.doc, schema, v, "body") {
			t.Errorf("%s %d: %s", op, status, p)
		}
	}
	if status < 300 {
		c.checked[op] = true
	}
}

// do sends a request to the app for the operation op (see app.do), with the path's
// parameters filled in from args in order and query appended, checks that the answer has
// status want (0: any) and is one the document gives and that the request is one the
// document agrees with (checkRequest), and returns it.
func (c *oaChecker) do(t testing.TB, a *app, want int, op, query, token string, hdr map[string]string, body any, args ...string) (int, []byte) {
	t.Helper()
	method, path, _ := strings.Cut(op, " ")
	i := 0
	path = wildcard.ReplaceAllStringFunc(path, func(string) string {
		i++
		return args[i-1]
	})
	status, h, data := a.do(t, method, path+query, token, hdr, body)
	if want != 0 && status != want {
		t.Errorf("%s %s: got %d %s; want %d", method, path+query, status, data, want)
	}
	c.check(t, op, status, h, data)
	c.checkRequest(t, op, query, body, status)
	return status, data
}

// checkRequest fails the test where the document and the server disagree about a request
// to op: the server took it (2xx) but the document refuses its query or JSON body, or
// requires a body it lacked; or the server found the JSON body malformed (400) and the
// document accepts it. Raw bodies (string, []byte) are the test's own and not checked.
func (c *oaChecker) checkRequest(t testing.TB, op, query string, body any, status int) {
	t.Helper()
	o := c.ops[op]
	var problems []string
	values, err := url.ParseQuery(strings.TrimPrefix(query, "?"))
	if err != nil {
		t.Fatalf("%s: got query %q (%v); want a valid one", op, query, err)
	}
	params := map[string]jsonObj{}
	for _, p := range o.params {
		if p["in"] == "query" {
			params[p["name"].(string)] = p
		}
	}
	for name, vs := range values {
		p, ok := params[name]
		if !ok {
			problems = append(problems, fmt.Sprintf("query: got %q; want only the documented parameters %v", name, slices.Sorted(maps.Keys(params))))
			continue
		}
		schema, _ := p["schema"].(jsonObj)
		for _, v := range vs {
			var x any = v
			if slices.Contains(oaTypes(oaResolve(t, c.doc, schema)["type"]), "integer") {
				x = json.Number(v)
			}
			problems = append(problems, oaValidate(t, c.doc, schema, x, "query "+name)...)
		}
	}
	rb, _ := o.op["requestBody"].(jsonObj)
	switch body.(type) {
	case nil:
		if rb["required"] == true {
			problems = append(problems, "request: got no body; want one (requestBody required)")
		}
	case string, []byte:
	default:
		schema := oaMedia(rb, "application/json")
		if schema == nil {
			problems = append(problems, "request: got a JSON body; want none (no requestBody documented)")
			break
		}
		data, _ := json.Marshal(body)
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.UseNumber()
		var v any
		dec.Decode(&v)
		bodyProblems := oaValidate(t, c.doc, schema, v, "request")
		if status == http.StatusBadRequest && len(bodyProblems) == 0 {
			t.Errorf("%s 400: request: got %s refused as malformed; want the document to refuse it too", op, oaShort(v))
		}
		problems = append(problems, bodyProblems...)
	}
	if status < 300 {
		for _, p := range problems {
			t.Errorf("%s %d (the server took it): %s", op, status, p)
		}
	}
}

// TestOpenAPIAuth: through HTTP, every documented operation that names a security scheme
// answers 401 without a token (and, if only the admin token lets a caller in, to a
// workspace key), and every other one answers without a token; each answer is one the
// document gives.
func TestOpenAPIAuth(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	c := newOAChecker(t)
	for _, o := range oaOperations(t, c.doc) {
		var args []string
		for _, m := range wildcard.FindAllStringSubmatch(o.path, -1) {
			switch m[1] {
			case "ws":
				args = append(args, ws.ID)
			default:
				args = append(args, "00000000-0000-4000-8000-000000000000")
			}
		}
		schemes := o.securedBy()
		status, body := c.do(t, a, 0, o.key(), "", "", nil, nil, args...)
		if (status == 401) != (len(schemes) > 0) {
			t.Errorf("%s without a token: got %d %s; want 401 exactly when security %v is not empty", o.key(), status, body, schemes)
		}
		if reflect.DeepEqual(schemes, []string{"adminToken"}) {
			c.do(t, a, 401, o.key(), "", ws.APIKey, nil, nil, args...) // admin only
		}
	}
}

// TestOpenAPIAnswers: real answers of every operation, successes and errors, have the
// documented status, media type and every documented field, and no other field; every
// request the server takes (every documented field and value sent at least once) is one
// the document accepts, and every body it finds malformed one the document refuses.
func TestOpenAPIAnswers(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}))
	c := newOAChecker(t)
	const admin = testAdminToken

	c.do(t, a, 200, "GET /healthz", "", "", nil, nil)
	c.do(t, a, 200, "GET /readyz", "", "", nil, nil)
	c.do(t, a, 200, "GET /metrics", "", "", nil, nil)
	c.do(t, a, 200, "GET /openapi.json", "", "", nil, nil)

	var ws testWorkspace
	_, body := c.do(t, a, 201, "POST /v1/workspaces", "", admin, nil, map[string]any{"name": "docs"})
	json.Unmarshal(body, &ws)
	c.do(t, a, 400, "POST /v1/workspaces", "", admin, nil, map[string]any{"name": "docs", "Name": "x"})
	c.do(t, a, 422, "POST /v1/workspaces", "", admin, nil, map[string]any{"name": " "})
	c.do(t, a, 200, "GET /v1/workspaces/{ws}", "", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 404, "GET /v1/workspaces/{ws}", "", admin, nil, nil, "00000000-0000-4000-8000-000000000000")
	_, body = c.do(t, a, 200, "POST /v1/workspaces/{ws}/rotate-key", "", ws.APIKey, nil, nil, ws.ID)
	json.Unmarshal(body, &ws)

	c.do(t, a, 201, "POST /v1/workspaces/{ws}/agents", "", ws.APIKey, nil, map[string]any{"name": "echo", "kind": "echo", "config": map[string]any{}}, ws.ID)
	c.do(t, a, 409, "POST /v1/workspaces/{ws}/agents", "", ws.APIKey, nil, map[string]any{"name": "echo", "kind": "echo"}, ws.ID)
	// A webhook to a port where nothing listens: its run fails with an error.
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/agents", "", ws.APIKey, nil, map[string]any{"name": "down", "kind": "webhook",
		"config": map[string]any{"url": "http://" + freeAddr(t) + "/run", "timeout_ms": 5000}}, ws.ID)
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/agents", "", ws.APIKey, nil, nil, ws.ID)
	// A capped agent whose name needs percent-encoding in a path.
	const capped = "capped/1 é"
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/agents", "", ws.APIKey, nil, map[string]any{"name": capped, "kind": "echo",
		"config": map[string]any{"delay_ms": 0}, "max_concurrency": 2, "paused": false}, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/agents", "", ws.APIKey, nil, map[string]any{"name": "x", "kind": "echo", "max_concurrency": 0}, ws.ID)
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, nil, ws.ID, url.PathEscape(capped))
	c.do(t, a, 404, "GET /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, nil, ws.ID, "nobody")
	c.do(t, a, 200, "PATCH /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil,
		map[string]any{"config": map[string]any{"delay_ms": 1}, "max_concurrency": nil, "paused": true}, ws.ID, url.PathEscape(capped))
	_, body = c.do(t, a, 200, "PATCH /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, map[string]any{"config": nil}, ws.ID, url.PathEscape(capped))
	if !strings.Contains(string(body), `"config":{}`) {
		t.Errorf("PATCH config null: got %s; want config {} (as documented)", body)
	}
	c.do(t, a, 200, "PATCH /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, map[string]any{}, ws.ID, url.PathEscape(capped))
	c.do(t, a, 400, "PATCH /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, map[string]any{"Paused": true}, ws.ID, url.PathEscape(capped))
	c.do(t, a, 400, "PATCH /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, nil, ws.ID, url.PathEscape(capped))
	c.do(t, a, 422, "PATCH /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, map[string]any{"max_concurrency": 1001}, ws.ID, url.PathEscape(capped))
	c.do(t, a, 422, "PATCH /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, map[string]any{"config": map[string]any{"url": "x"}}, ws.ID, url.PathEscape(capped))
	c.do(t, a, 404, "PATCH /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, map[string]any{"paused": false}, ws.ID, "nobody")

	var run, failing runRecord
	hdr := map[string]string{"Idempotency-Key": "docs-1"}
	_, body = c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, hdr, map[string]any{"agent": "echo", "input": map[string]any{"q": 1}, "max_attempts": 2}, ws.ID)
	json.Unmarshal(body, &run)
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, hdr, map[string]any{"agent": "echo", "input": map[string]any{"q": 1}, "max_attempts": 2}, ws.ID)
	c.do(t, a, 409, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, hdr, map[string]any{"agent": "echo", "input": 2}, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "nobody"}, ws.ID)
	_, body = c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "down", "max_attempts": 1}, ws.ID)
	json.Unmarshal(body, &failing)
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs/batch", "", ws.APIKey, nil, map[string]any{"runs": []any{map[string]any{"agent": "echo"}}}, ws.ID)
	c.do(t, a, 413, "POST /v1/workspaces/{ws}/runs/batch", "", ws.APIKey, nil, strings.Repeat(" ", maxBody+1), ws.ID)

	c.do(t, a, 200, "POST /v1/worker/process", "", admin, nil, map[string]any{"limit": 10})
	c.do(t, a, 422, "POST /v1/worker/process", "", admin, nil, map[string]any{"limit": 0})
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/runs/{id}", "?wait_ms=30000", ws.APIKey, nil, nil, ws.ID, run.ID)
	_, body = c.do(t, a, 200, "GET /v1/workspaces/{ws}/runs/{id}", "?wait_ms=30000", ws.APIKey, nil, nil, ws.ID, failing.ID)
	json.Unmarshal(body, &failing)
	if failing.Status != statusFailed || !strings.Contains(string(failing.Errors), "message") {
		t.Errorf("webhook run to a closed port: got %s errors %s; want failed with an error (so RunError is checked)", failing.Status, failing.Errors)
	}
	c.do(t, a, 422, "GET /v1/workspaces/{ws}/runs/{id}", "?wait_ms=-1", ws.APIKey, nil, nil, ws.ID, run.ID)
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/runs", "?limit=1", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 422, "GET /v1/workspaces/{ws}/runs", "?status=nope", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/stats", "", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 409, "POST /v1/workspaces/{ws}/runs/{id}/cancel", "", ws.APIKey, nil, nil, ws.ID, run.ID)
	_, body = c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "echo"}, ws.ID)
	var queued runRecord
	json.Unmarshal(body, &queued)
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/{id}/cancel", "", ws.APIKey, nil, nil, ws.ID, queued.ID)

	// Scheduled runs stay queued (no worker runs here), for the bulk cancel below.
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "echo", "input": []any{1},
		"priority": 3, "run_at": "2030-01-02T15:04:05+02:00", "timeout_ms": 60000}, ws.ID)
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs/batch", "", ws.APIKey, nil, map[string]any{"runs": []any{
		map[string]any{"agent": "echo", "priority": 9, "delay_ms": 3600000, "max_attempts": 25}}}, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "echo", "run_at": "2030-01-02T15:04:05Z", "delay_ms": 1}, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "echo", "priority": 10}, ws.ID)
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/runs", "?agent=echo&status=queued&limit=200", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/runs", "?agent=nobody", ws.APIKey, nil, nil, ws.ID)

	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/{id}/retry", "", ws.APIKey, nil, map[string]any{"attempts": 2}, ws.ID, failing.ID)
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/{id}/retry", "", ws.APIKey, nil, nil, ws.ID, queued.ID)
	c.do(t, a, 409, "POST /v1/workspaces/{ws}/runs/{id}/retry", "", ws.APIKey, nil, nil, ws.ID, queued.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs/{id}/retry", "", ws.APIKey, nil, map[string]any{"attempts": 26}, ws.ID, run.ID)
	c.do(t, a, 404, "POST /v1/workspaces/{ws}/runs/{id}/retry", "", ws.APIKey, nil, nil, ws.ID, "00000000-0000-4000-8000-000000000000")

	c.do(t, a, 400, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{"agent": "nobody"}, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{"status": "failed"}, ws.ID)
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{"agent": "down", "status": "queued"}, ws.ID)
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{"status": "running"}, ws.ID)
	_, body = c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{}, ws.ID)
	if got := string(body); got != `{"canceled":3}`+"\n" {
		t.Errorf("cancel of the queued echo runs: got %q; want {\"canceled\":3}", got)
	}

	eventually(t, 30*time.Second, "this process is in the workers table", func() bool {
		_, body := c.do(t, a, 200, "GET /v1/workers", "", admin, nil, nil)
		return strings.Contains(string(body), `"hostname"`)
	})

	for op := range c.ops {
		if !c.checked[op] {
			t.Errorf("%s: got no success answer checked; want every operation's (add it to this test)", op)
		}
	}
}

// TestOpenAPIRequestBodies: the documented run request has exactly the fields the
// server decodes, so a strict schema (additionalProperties false) cannot drift from it.
func TestOpenAPIRequestBodies(t *testing.T) {
	doc := oaDoc(t)
	schema := oaResolve(t, doc, jsonObj{"$ref": "#/components/schemas/RunRequest"})
	props, _ := schema["properties"].(jsonObj)
	got := slices.Sorted(maps.Keys(props))
	var want []string
	for name := range jsonFields(reflect.TypeOf(runRequest{})) {
		want = append(want, name)
	}
	sort.Strings(want)
	if !slices.Equal(got, want) || schema["additionalProperties"] != false {
		t.Errorf("RunRequest: got properties %v (additionalProperties %v); want %v, false", got, schema["additionalProperties"], want)
	}
}
