package main

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"mime"
	"net/http"
	"net/http/httptest"
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
//
// Adding a console route: register it in console() (console.go), whose routeMux records it
// like the API's; document it in openapi.json under its /ui/ path with security
// consoleSession (none for what anyone may fetch), its answers as text/html pages from
// components.responses (a page: Page and ToSignIn; a form: a 303 with its Location, 400
// PageBadRequest and 403 PageForbidden, the form's fields in a schema that requires csrf,
// as CSRFForm does, plus the page errors it may answer); then call it in
// TestOpenAPIAnswers with c.browse as a signed-in browser, success and each error.
// TestOpenAPIMatchesMux fails until both sides agree, TestOpenAPIAnswers until it is called.

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
		path = strings.TrimSuffix(path, "{$}") // "/ui/{$}" is the path "/ui/" exactly
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
	oaCheckRunFrame(t, schemas)
}

// oaCheckRunFrame: a stream's run (RunFrame) is the Run without input and output, so the
// two cannot drift apart.
func oaCheckRunFrame(t *testing.T, schemas jsonObj) {
	t.Helper()
	run, _ := schemas["Run"].(jsonObj)
	frame, _ := schemas["RunFrame"].(jsonObj)
	props := maps.Clone(run["properties"].(jsonObj))
	delete(props, "input")
	delete(props, "output")
	var required []any
	for _, r := range asList(run["required"]) {
		if r != "input" && r != "output" {
			required = append(required, r)
		}
	}
	if !reflect.DeepEqual(frame["properties"], props) || !reflect.DeepEqual(asList(frame["required"]), required) ||
		frame["additionalProperties"] != run["additionalProperties"] {
		t.Errorf("RunFrame: got %s; want Run's properties, required and additionalProperties without input and output", oaShort(frame))
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
		success = success || o.succeeded(n)
		if n >= 400 && oaConsole(o.path) {
			if oaMedia(r, "text/html") == nil {
				t.Errorf("%s %s: got content %v; want an HTML page (the console answers its errors as pages)", o.key(), code, r["content"])
			}
		} else if n >= 400 && !oaNotErrors[o.key()+" "+code] {
			schema := oaResolve(t, doc, oaMedia(r, "application/json"))
			if !reflect.DeepEqual(schema, oaResolve(t, doc, jsonObj{"$ref": "#/components/schemas/Error"})) {
				t.Errorf("%s %s: got schema %v; want the Error format", o.key(), code, schema)
			}
		}
	}
	if !success {
		t.Errorf("%s: got no success response; want one (a 2xx, or a form's 303)", o.key())
	}
	if oaConsole(o.path) {
		oaCheckConsole(t, doc, o)
	} else if _, ok := responses["401"]; ok != (len(o.securedBy()) > 0) {
		t.Errorf("%s: got 401 documented %v with security %v; want it exactly when a token is needed", o.key(), ok, o.securedBy())
	}
}

// oaConsole reports whether path is the console's: HTML pages, its errors too, and a
// session cookie instead of a bearer token. "/" is its door, a redirect to /ui/.
func oaConsole(path string) bool { return path == "/" || strings.HasPrefix(path, "/ui/") }

// oaCheckConsole checks what a console operation must document: the session as its only
// security, or none; a page that needs the session sends the browser to sign in (303
// ToSignIn); and every form carries its csrf field and is 403 without it.
func oaCheckConsole(t *testing.T, doc jsonObj, o oaOperation) {
	t.Helper()
	secured := len(o.securedBy()) > 0
	if secured && !slices.Equal(o.securedBy(), []string{"consoleSession"}) {
		t.Errorf("%s: got security %v; want consoleSession or none", o.key(), o.securedBy())
	}
	responses, _ := o.op["responses"].(jsonObj)
	if o.method == "GET" && secured {
		r, _ := responses["303"].(jsonObj)
		if !reflect.DeepEqual(r, jsonObj{"$ref": "#/components/responses/ToSignIn"}) {
			t.Errorf("%s 303: got %v; want ToSignIn (a page without a session goes to the sign-in form)", o.key(), r)
		}
	}
	if o.method == "POST" {
		rb, _ := o.op["requestBody"].(jsonObj)
		form := oaMedia(rb, "application/x-www-form-urlencoded")
		if form == nil || !slices.Contains(asList(oaResolve(t, doc, form)["required"]), any("csrf")) {
			t.Errorf("%s: got form %v; want a form that requires its csrf field", o.key(), form)
		}
		if _, ok := responses["403"]; !ok {
			t.Errorf("%s: got no 403 documented; want it (a form without its CSRF token)", o.key())
		}
	}
}

// succeeded reports whether status is a success of o: a 2xx, or the 303 of an operation
// that documents no 2xx (a console form, answered with a redirect).
func (o oaOperation) succeeded(status int) bool {
	if status != http.StatusSeeOther {
		return status >= 200 && status < 300
	}
	responses, _ := o.op["responses"].(jsonObj)
	for code := range responses {
		if strings.HasPrefix(code, "2") {
			return false
		}
	}
	return true
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

// check fails the test unless the answer (status, headers, Content-Type, body) is one the
// document gives for the operation "METHOD /path/{template}". An answer documented without
// content (a redirect) may have any: only its headers are checked.
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
	headers, _ := r["headers"].(jsonObj)
	for name, hv := range headers {
		hv := oaResolve(t, c.doc, hv.(jsonObj))
		v := h.Get(name)
		if v == "" {
			if hv["required"] == true {
				t.Errorf("%s %d: got no %s header; want one (required)", op, status, name)
			}
			continue
		}
		schema, _ := hv["schema"].(jsonObj)
		for _, p := range oaValidate(t, c.doc, schema, v, "header "+name) {
			t.Errorf("%s %d: %s", op, status, p)
		}
	}
	mediaType, _, _ := mime.ParseMediaType(h.Get("Content-Type"))
	content, _ := r["content"].(jsonObj)
	if len(content) == 0 {
		if o.succeeded(status) {
			c.checked[op] = true
		}
		return
	}
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
	if mediaType == "text/html" && !strings.HasPrefix(strings.ToLower(string(body)), "<!doctype html>") {
		t.Errorf("%s %d: got body %s; want an HTML page", op, status, oaShort(string(body)))
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
	if o.succeeded(status) {
		c.checked[op] = true
	}
}

// oaFill returns op's method and path with the path's parameters filled in from args, in
// order.
func oaFill(op string, args []string) (method, path string) {
	method, path, _ = strings.Cut(op, " ")
	i := 0
	path = wildcard.ReplaceAllStringFunc(path, func(string) string {
		i++
		return args[i-1]
	})
	return method, path
}

// do sends a request to the app for the operation op (see app.do), with the path's
// parameters filled in from args in order and query appended, checks that the answer has
// status want (0: any) and is one the document gives and that the request is one the
// document agrees with (checkRequest), and returns it.
func (c *oaChecker) do(t testing.TB, a *app, want int, op, query, token string, hdr map[string]string, body any, args ...string) (int, []byte) {
	t.Helper()
	method, path := oaFill(op, args)
	status, h, data := a.do(t, method, path+query, token, hdr, body)
	if want != 0 && status != want {
		t.Errorf("%s %s: got %d %s; want %d", method, path+query, status, data, want)
	}
	c.check(t, op, status, h, data)
	c.checkRequest(t, op, query, body, status)
	return status, data
}

// browse is do for the console: the request goes through browser b (its cookies, and
// form as the body when it is not nil), redirects are not followed, and the page is
// returned.
func (c *oaChecker) browse(t testing.TB, b *browser, want int, op, query string, form url.Values, args ...string) page {
	t.Helper()
	method, path := oaFill(op, args)
	p := b.do(t, method, path+query, form)
	if want != 0 && p.status != want {
		t.Errorf("%s %s: got %d (Location %q); want %d; body:\n%s", method, path+query, p.status, p.location, want, p.body)
	}
	c.check(t, op, p.status, p.header, []byte(p.body))
	var body any
	if form != nil {
		body = form
	}
	c.checkRequest(t, op, query, body, p.status)
	return p
}

// oaStreamWait bounds the wait for a stream's next frame: generous, for a loaded machine.
const oaStreamWait = 30 * time.Second

// stream opens op's stream with evStream, which fails the test unless it is answered 200
// text/event-stream, checks that answer against the document and returns the frames.
func (c *oaChecker) stream(t testing.TB, a *app, op, query, token string, args ...string) <-chan sseFrame {
	t.Helper()
	_, path := oaFill(op, args)
	frames := evStream(t, a.base+path+query, token, nil)
	c.check(t, op, http.StatusOK, http.Header{"Content-Type": {"text/event-stream"}}, nil)
	c.checkRequest(t, op, query, nil, http.StatusOK)
	return frames
}

// frame reads the next frame of op's stream that is not a comment and fails the test
// unless it is one the document describes: on a run's stream a status frame or an event
// frame (its id the event's seq, its event the event's type, its data a RunEvent), on a
// workspace's a run frame; status and run frames have no id and a RunFrame as data. It
// returns the frame's event and data.
func (c *oaChecker) frame(t testing.TB, op string, frames <-chan sseFrame) (string, jsonObj) {
	t.Helper()
	f, ok := evNext(t, frames, oaStreamWait)
	if !ok {
		t.Fatalf("%s: got the stream ended; want a frame", op)
	}
	var data jsonObj
	dec := json.NewDecoder(strings.NewReader(f.Data))
	dec.UseNumber()
	if err := dec.Decode(&data); err != nil {
		t.Fatalf("%s: got frame %+v (%v); want JSON data", op, f, err)
	}
	schema := "RunEvent"
	if f.Event == "status" || f.Event == "run" {
		schema = "RunFrame"
	}
	for _, p := range oaValidate(t, c.doc, jsonObj{"$ref": "#/components/schemas/" + schema}, data, f.Event+" frame") {
		t.Errorf("%s: %s", op, p)
	}
	switch {
	case (f.Event == "run") != (op == "GET /v1/workspaces/{ws}/events"):
		t.Errorf("%s: got a %q frame; want run frames on a workspace's stream only", op, f.Event)
	case schema == "RunFrame" && f.ID != "":
		t.Errorf("%s: got id %q on a %s frame; want none", op, f.ID, f.Event)
	case schema == "RunEvent" && (f.ID != fmt.Sprint(data["seq"]) || f.Event != data["type"]):
		t.Errorf("%s: got id %q event %q for event %s; want its seq and type", op, f.ID, f.Event, f.Data)
	}
	return f.Event, data
}

// checkRequest fails the test where the document and the server disagree about a request
// to op: the server took it (a success) but the document refuses its query, JSON body or
// form (url.Values), or requires a body it lacked; or the server found the JSON body
// malformed (400) and the document accepts it. Raw bodies (string, []byte) are the test's
// own and not checked.
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
	switch b := body.(type) {
	case nil:
		if rb["required"] == true {
			problems = append(problems, "request: got no body; want one (requestBody required)")
		}
	case string, []byte:
	case url.Values:
		schema := oaMedia(rb, "application/x-www-form-urlencoded")
		if schema == nil {
			problems = append(problems, "request: got a form; want none (no form documented)")
			break
		}
		fields := jsonObj{}
		for k := range b {
			fields[k] = b.Get(k)
		}
		problems = append(problems, oaValidate(t, c.doc, schema, fields, "form")...)
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
	if o.succeeded(status) {
		for _, p := range problems {
			t.Errorf("%s %d (the server took it): %s", op, status, p)
		}
	}
}

// TestOpenAPIAuth: through HTTP, every documented operation that names a security scheme
// answers 401 without a token (and, if only the admin token lets a caller in, to a
// workspace key), and every other one answers without a token; on the console, to a
// browser without cookies, a page that needs the session is a 303 to the sign-in form,
// every form is 403 (no CSRF token) and the rest answer 200. Each answer is one the
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
		if oaConsole(o.path) {
			var form url.Values
			want := http.StatusOK
			switch {
			case o.method == "POST":
				form, want = url.Values{}, http.StatusForbidden // a form without its csrf field
			case o.path == "/":
				want = http.StatusSeeOther // to the console
			case len(schemes) > 0:
				want = http.StatusSeeOther // ToSignIn: its Location is checked against the document
			}
			c.browse(t, newBrowser(a), want, o.key(), "", form, args...)
			continue
		}
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
// documented status, media type, headers and every documented field, and no other field;
// streams' frames are the documented ones; every request the server takes (every
// documented field and value sent at least once) is one the document accepts, and every
// body it finds malformed one the document refuses.
func TestOpenAPIAnswers(t *testing.T) {
	t.Parallel()
	env := testEnv(t, testDB(t), map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"})
	a := startApp(t, env)
	c := newOAChecker(t)
	const admin = testAdminToken
	const nobody = "00000000-0000-4000-8000-000000000000"

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
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/agents/{name}/rotate-secret", "", ws.APIKey, nil, nil, ws.ID, "down")
	c.do(t, a, 409, "POST /v1/workspaces/{ws}/agents/{name}/rotate-secret", "", ws.APIKey, nil, nil, ws.ID, "echo")
	c.do(t, a, 404, "POST /v1/workspaces/{ws}/agents/{name}/rotate-secret", "", ws.APIKey, nil, nil, ws.ID, "nobody")
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
	tp := map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs/batch", "", ws.APIKey, tp, map[string]any{"runs": []any{map[string]any{"agent": "echo"}}}, ws.ID)
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, tp, map[string]any{"agent": "echo"}, ws.ID)
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

	// A run whose webhook answered 202: it waits for a signal (its JSON shows waiting_for),
	// and is queued again by the signal, once.
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusAccepted)
		io.WriteString(w, `{"state":{"n":1},"wait":{"signal":"approve","timeout_ms":600000}}`)
	}))
	t.Cleanup(hook.Close)
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/agents", "", ws.APIKey, nil, map[string]any{"name": "waits", "kind": "webhook",
		"config": map[string]any{"url": hook.URL}}, ws.ID)
	var waiting runRecord
	_, body = c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "waits"}, ws.ID)
	json.Unmarshal(body, &waiting)
	c.do(t, a, 200, "POST /v1/worker/process", "", admin, nil, map[string]any{"limit": 100})
	_, body = c.do(t, a, 200, "GET /v1/workspaces/{ws}/runs/{id}", "", ws.APIKey, nil, nil, ws.ID, waiting.ID)
	json.Unmarshal(body, &waiting)
	if waiting.Status != statusWaiting || waiting.Step != 2 {
		t.Errorf("run whose webhook answered 202: got %s at step %d; want waiting at step 2", waiting.Status, waiting.Step)
	}
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/runs", "?parent="+waiting.ID, ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 422, "GET /v1/workspaces/{ws}/runs", "?parent=nope", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs/{id}/signal", "", ws.APIKey, nil, map[string]any{"name": "Approve"}, ws.ID, waiting.ID)
	c.do(t, a, 400, "POST /v1/workspaces/{ws}/runs/{id}/signal", "", ws.APIKey, nil, map[string]any{"name": "approve", "Data": 1}, ws.ID, waiting.ID)
	c.do(t, a, 409, "POST /v1/workspaces/{ws}/runs/{id}/signal", "", ws.APIKey, nil, map[string]any{"name": "deny"}, ws.ID, waiting.ID)
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/{id}/signal", "", ws.APIKey, nil, map[string]any{"name": "approve", "data": map[string]any{"ok": true}}, ws.ID, waiting.ID)
	c.do(t, a, 409, "POST /v1/workspaces/{ws}/runs/{id}/signal", "", ws.APIKey, nil, map[string]any{"name": "approve"}, ws.ID, waiting.ID)
	c.do(t, a, 404, "POST /v1/workspaces/{ws}/runs/{id}/signal", "", ws.APIKey, nil, map[string]any{"name": "approve"}, ws.ID, nobody)

	c.do(t, a, 400, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{"agent": "nobody"}, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{"status": "failed"}, ws.ID)
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{"agent": "down", "status": "queued"}, ws.ID)
	c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{"status": "running"}, ws.ID)
	_, body = c.do(t, a, 200, "POST /v1/workspaces/{ws}/runs/cancel", "", ws.APIKey, nil, map[string]any{}, ws.ID)
	if got := string(body); got != `{"canceled":3}`+"\n" {
		t.Errorf("cancel of the queued echo runs: got %q; want {\"canceled\":3}", got)
	}

	// Schedules (no worker runs here: a paused one, and one due daily, make no runs).
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/schedules", "", ws.APIKey, nil, map[string]any{"name": "nightly", "cron": "30 2 * * *",
		"timezone": "Europe/Berlin", "agent": "echo", "input": map[string]any{"q": 1}, "priority": 1, "timeout_ms": 1000,
		"max_attempts": 2, "paused": false}, ws.ID)
	c.do(t, a, 409, "POST /v1/workspaces/{ws}/schedules", "", ws.APIKey, nil, map[string]any{"name": "nightly", "cron": "@daily", "agent": "echo"}, ws.ID)
	c.do(t, a, 422, "POST /v1/workspaces/{ws}/schedules", "", ws.APIKey, nil, map[string]any{"name": "x", "cron": "@daily", "agent": "echo", "timezone": "Nowhere"}, ws.ID)
	c.do(t, a, 400, "POST /v1/workspaces/{ws}/schedules", "", ws.APIKey, nil, map[string]any{"name": "x", "Cron": "@daily", "agent": "echo"}, ws.ID)
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/schedules", "", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/schedules/{name}", "", ws.APIKey, nil, nil, ws.ID, "nightly")
	c.do(t, a, 404, "GET /v1/workspaces/{ws}/schedules/{name}", "", ws.APIKey, nil, nil, ws.ID, "nobody")
	c.do(t, a, 200, "PATCH /v1/workspaces/{ws}/schedules/{name}", "", ws.APIKey, nil, map[string]any{"paused": true, "timeout_ms": nil}, ws.ID, "nightly")
	c.do(t, a, 422, "PATCH /v1/workspaces/{ws}/schedules/{name}", "", ws.APIKey, nil, map[string]any{"cron": "61 * * * *"}, ws.ID, "nightly")
	c.do(t, a, 200, "GET /v1/workspaces/{ws}/runs", "?schedule=nightly", ws.APIKey, nil, nil, ws.ID)
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/schedules", "", ws.APIKey, nil, map[string]any{"name": "gone", "cron": "@every 1h", "agent": "echo"}, ws.ID)
	c.do(t, a, 204, "DELETE /v1/workspaces/{ws}/schedules/{name}", "", ws.APIKey, nil, nil, ws.ID, "gone")
	c.do(t, a, 404, "DELETE /v1/workspaces/{ws}/schedules/{name}", "", ws.APIKey, nil, nil, ws.ID, "gone")

	oaAnswersEvents(t, a, c, openTestDB(t, env["DATABASE_URL"]))

	// The console, as a browser signed in with the workspace's key uses it.
	b := newBrowser(a)
	c.browse(t, b, 303, "GET /", "", nil)
	form := c.browse(t, b, 200, "GET /ui/sign-in", "", nil)
	c.browse(t, b, 403, "POST /ui/sign-in", "", url.Values{"token": {ws.APIKey}})
	form = c.browse(t, b, 401, "POST /ui/sign-in", "", url.Values{"csrf": {form.csrf(t)}, "token": {"not a key"}})
	c.browse(t, b, 303, "POST /ui/sign-in", "", url.Values{"csrf": {form.csrf(t)}, "token": {ws.APIKey}})
	c.browse(t, b, 303, "GET /ui/sign-in", "", nil)
	csrf := c.browse(t, b, 200, "GET /ui/", "", nil).csrf(t)
	c.browse(t, b, 200, "GET /ui/runs", "?status=succeeded&agent=echo&workspace="+ws.ID, nil)
	c.browse(t, b, 422, "GET /ui/runs", "?status=nope", nil)
	c.browse(t, b, 200, "GET /ui/runs/{id}", "", nil, run.ID)
	c.browse(t, b, 404, "GET /ui/runs/{id}", "", nil, nobody)
	c.browse(t, b, 200, "GET /ui/agents", "", nil)
	c.browse(t, b, 200, "GET /ui/style.css", "", nil)
	c.browse(t, b, 200, "GET /ui/live.js", "", nil)
	c.browse(t, b, 200, "GET /ui/flash.js", "", nil)
	_, body = c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "echo"}, ws.ID)
	var doomed runRecord
	json.Unmarshal(body, &doomed)
	c.browse(t, b, 403, "POST /ui/runs/{id}/cancel", "", url.Values{}, doomed.ID)
	c.browse(t, b, 303, "POST /ui/runs/{id}/cancel", "", url.Values{"csrf": {csrf}}, doomed.ID)
	c.browse(t, b, 409, "POST /ui/runs/{id}/cancel", "", url.Values{"csrf": {csrf}}, doomed.ID)
	c.browse(t, b, 404, "POST /ui/runs/{id}/cancel", "", url.Values{"csrf": {csrf}}, nobody)
	c.browse(t, b, 303, "POST /ui/runs/{id}/retry", "", url.Values{"csrf": {csrf}}, doomed.ID)
	c.browse(t, b, 409, "POST /ui/runs/{id}/retry", "", url.Values{"csrf": {csrf}}, doomed.ID)
	// A waiting run's page offers its signal; the form sends it once.
	_, body = c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "waits"}, ws.ID)
	var approve runRecord
	json.Unmarshal(body, &approve)
	c.do(t, a, 200, "POST /v1/worker/process", "", admin, nil, map[string]any{"limit": 100})
	c.browse(t, b, 200, "GET /ui/runs/{id}", "", nil, approve.ID)
	c.browse(t, b, 403, "POST /ui/runs/{id}/signal", "", url.Values{"name": {"approve"}}, approve.ID)
	c.browse(t, b, 422, "POST /ui/runs/{id}/signal", "", url.Values{"csrf": {csrf}, "name": {"approve"}, "data": {"{not json"}}, approve.ID)
	c.browse(t, b, 422, "POST /ui/runs/{id}/signal", "", url.Values{"csrf": {csrf}, "name": {"No"}}, approve.ID)
	c.browse(t, b, 303, "POST /ui/runs/{id}/signal", "", url.Values{"csrf": {csrf}, "name": {"approve"}, "data": {`{"ok":true}`}}, approve.ID)
	c.browse(t, b, 409, "POST /ui/runs/{id}/signal", "", url.Values{"csrf": {csrf}, "name": {"approve"}}, approve.ID)
	c.browse(t, b, 404, "POST /ui/runs/{id}/signal", "", url.Values{"csrf": {csrf}, "name": {"approve"}}, nobody)
	c.browse(t, b, 303, "POST /ui/runs/cancel-queued", "", url.Values{"csrf": {csrf}})
	var echo agent
	_, body = c.do(t, a, 200, "GET /v1/workspaces/{ws}/agents/{name}", "", ws.APIKey, nil, nil, ws.ID, "echo")
	json.Unmarshal(body, &echo)
	c.browse(t, b, 303, "POST /ui/agents/{id}/pause", "", url.Values{"csrf": {csrf}}, echo.ID)
	c.browse(t, b, 303, "POST /ui/agents/{id}/resume", "", url.Values{"csrf": {csrf}}, echo.ID)
	c.browse(t, b, 404, "POST /ui/agents/{id}/pause", "", url.Values{"csrf": {csrf}}, nobody)
	c.browse(t, b, 200, "GET /ui/schedules", "", nil)
	var nightly struct{ ID string }
	_, body = c.do(t, a, 200, "GET /v1/workspaces/{ws}/schedules/{name}", "", ws.APIKey, nil, nil, ws.ID, "nightly")
	json.Unmarshal(body, &nightly)
	c.browse(t, b, 303, "POST /ui/schedules/{id}/resume", "", url.Values{"csrf": {csrf}}, nightly.ID)
	c.browse(t, b, 303, "POST /ui/schedules/{id}/pause", "", url.Values{"csrf": {csrf}}, nightly.ID)
	c.browse(t, b, 404, "POST /ui/schedules/{id}/pause", "", url.Values{"csrf": {csrf}}, nobody)
	c.browse(t, b, 303, "POST /ui/sign-out", "", url.Values{"csrf": {csrf}})
	c.browse(t, b, 303, "GET /ui/", "", nil)

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

// oaAnswersEvents is TestOpenAPIAnswers' part for progress events and streams: a webhook
// agent served by the test posts with the token its call's body carries, while the run's
// and the workspace's streams are open.
func oaAnswersEvents(t *testing.T, a *app, c *oaChecker, db *sql.DB) {
	const admin, nobody = testAdminToken, "00000000-0000-4000-8000-000000000000"
	const post, runEvents, wsEvents = "POST /v1/runs/{id}/events", "GET /v1/workspaces/{ws}/runs/{id}/events", "GET /v1/workspaces/{ws}/events"
	hook, calls := evAgent(t)
	var ws testWorkspace
	_, body := c.do(t, a, 201, "POST /v1/workspaces", "", admin, nil, map[string]any{"name": "events"})
	json.Unmarshal(body, &ws)
	c.do(t, a, 201, "POST /v1/workspaces/{ws}/agents", "", ws.APIKey, nil, map[string]any{"name": "hook", "kind": "webhook",
		"config": map[string]any{"url": hook}}, ws.ID)
	var run runRecord
	_, body = c.do(t, a, 201, "POST /v1/workspaces/{ws}/runs", "", ws.APIKey, nil, map[string]any{"agent": "hook", "max_attempts": 1}, ws.ID)
	json.Unmarshal(body, &run)

	frames := c.stream(t, a, runEvents, "", ws.APIKey, ws.ID, run.ID)
	if event, data := c.frame(t, runEvents, frames); event != "status" || data["status"] != "queued" {
		t.Errorf("run stream's first frame: got %s %v; want status queued", event, data["status"])
	}
	changes := c.stream(t, a, wsEvents, "", ws.APIKey, ws.ID)
	// The worker API answers once the run it claimed has finished: after the agent answers.
	type answer struct {
		status int
		h      http.Header
		body   []byte
		err    error
	}
	processed := make(chan answer, 1)
	process := map[string]any{"limit": 1, "workspace_id": ws.ID}
	go func() {
		var r answer
		r.status, r.h, r.body, r.err = send(testClient, "POST", a.base+"/v1/worker/process", admin, nil, process)
		processed <- r
	}()
	call := evNextCall(t, calls)
	if want := a.base + "/v1/runs/" + run.ID + "/events"; call.EventsURL != want || call.EventsToken == "" {
		t.Errorf("webhook call: got events_url %q, events_token %q; want %q and a token", call.EventsURL, call.EventsToken, want)
	}
	if _, data := c.frame(t, wsEvents, changes); data["id"] != run.ID {
		t.Errorf("workspace stream's first frame: got run %v; want %s", data["id"], run.ID)
	}
	if event, data := c.frame(t, runEvents, frames); event != "status" || data["status"] != "running" {
		t.Errorf("run stream: got %s %v; want status running", event, data["status"])
	}
	_, body = c.do(t, a, 202, post, "", call.EventsToken, nil, map[string]any{"type": "step.1", "data": map[string]any{"n": 1}}, run.ID)
	if string(body) != `{"seq":1}`+"\n" {
		t.Errorf("first event: got %s; want {\"seq\":1}", body)
	}
	if event, data := c.frame(t, runEvents, frames); event != "step.1" || data["attempt"] != json.Number("1") {
		t.Errorf("run stream: got %s of attempt %v; want the event step.1 of attempt 1", event, data["attempt"])
	}
	_, body = c.do(t, a, 200, runEvents, "?after=0", ws.APIKey, nil, nil, ws.ID, run.ID)
	if !strings.Contains(string(body), `"type":"step.1"`) {
		t.Errorf("events page: got %s; want the event step.1", body)
	}
	c.do(t, a, 422, runEvents, "?after=-1", ws.APIKey, nil, nil, ws.ID, run.ID)
	c.do(t, a, 422, runEvents, "", ws.APIKey, map[string]string{"Accept": "text/event-stream", "Last-Event-ID": "x"}, nil, ws.ID, run.ID)
	c.do(t, a, 404, runEvents, "", ws.APIKey, nil, nil, ws.ID, nobody)
	c.do(t, a, 404, wsEvents, "", admin, nil, nil, nobody)

	c.do(t, a, 401, post, "", "1.bm90IGEgdG9rZW4", nil, map[string]any{"type": "x"}, run.ID)
	c.do(t, a, 400, post, "", call.EventsToken, nil, map[string]any{"type": "x", "extra": 1}, run.ID)
	c.do(t, a, 422, post, "", call.EventsToken, nil, map[string]any{"type": "Step"}, run.ID)
	c.do(t, a, 413, post, "", call.EventsToken, nil, map[string]any{"type": "x", "data": strings.Repeat("a", maxEventBody)}, run.ID)
	// The run's counter stands for 10,000 posted events (as in TestEventsThroughHTTP): one more is 429.
	if _, err := db.Exec(`UPDATE runs SET events_count = $2 WHERE id = $1`, run.ID, maxRunEvents); err != nil {
		t.Fatal(err)
	}
	c.do(t, a, 429, post, "", call.EventsToken, nil, map[string]any{"type": "x"}, run.ID)

	close(call.done)
	r := <-processed
	if r.err != nil {
		t.Fatalf("POST /v1/worker/process: got %v; want an answer", r.err)
	}
	c.check(t, "POST /v1/worker/process", r.status, r.h, r.body)
	c.checkRequest(t, "POST /v1/worker/process", "", process, r.status)
	if event, data := c.frame(t, runEvents, frames); event != "status" || data["status"] != "succeeded" {
		t.Errorf("run stream: got %s %v; want status succeeded", event, data["status"])
	}
	evExpectEnd(t, frames, oaStreamWait)
	c.do(t, a, 409, post, "", call.EventsToken, nil, map[string]any{"type": "late"}, run.ID)
}
