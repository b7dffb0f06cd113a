package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// maxStoredJSON is the largest value agentapp stores and answers, measured in the form it
// is stored and answered (SPEC, "HTTP API"): what PostgreSQL's jsonb prints can be far
// larger than what was sent, as numbers are printed in full.
const maxStoredJSON = 1 << 20

// numeric's limits (PostgreSQL, "Arbitrary Precision Numbers"): digits before the decimal
// point, digits after it, and the exponent its input accepts at all (INT_MAX/2).
const (
	numericMaxIntDigits  = 131072
	numericMaxScale      = 16383
	numericMaxExponent   = 1<<30 - 1
	numberErrorMaxQuoted = 24 // a refused number is quoted up to this many bytes
)

// checkStorable refuses a JSON value that jsonb cannot store, or that is over
// maxStoredJSON as stored and answered. Its messages read after the value's name:
// "webhook output" + " is over 1 MiB as stored (N bytes)", or + " cannot be stored: …".
func checkStorable(raw []byte) error {
	n, err := storedJSONSize(raw)
	if err != nil {
		return fmt.Errorf("cannot be stored: %v", err)
	}
	if n > maxStoredJSON {
		return fmt.Errorf("is over 1 MiB as stored (%d bytes)", n)
	}
	return nil
}

// storedJSONSize returns the size in bytes of the JSON value raw as agentapp stores and
// answers it, or an error saying why jsonb cannot store it at all: invalid UTF-8, \u0000 or
// an unpaired surrogate in a string, a number outside numeric's range.
//
// The size is a bound never below either form and close to both: jsonb prints ", " and
// ": " between items and numbers as numeric prints them (1e3 as 1000, 1.50 as 1.50), and
// the API's encoder then escapes <, >, &, U+2028 and U+2029 as \uXXXX; each token is
// counted at the larger of its two forms. A key given twice is counted twice, though jsonb
// keeps only the last.
func storedJSONSize(raw []byte) (int, error) {
	if !utf8.Valid(raw) {
		return 0, errors.New("invalid UTF-8")
	}
	if !json.Valid(raw) {
		return 0, errors.New("not valid JSON")
	}
	n := 0
	for i := 0; i < len(raw); {
		switch c := raw[i]; {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == ',' || c == ':':
			n, i = n+2, i+1
		case c == '"':
			size, end, err := jsonStringSize(raw, i)
			if err != nil {
				return 0, err
			}
			n, i = n+size, end
		case c == '-' || c >= '0' && c <= '9':
			end := i + 1
			for end < len(raw) && strings.IndexByte("+-.eE0123456789", raw[end]) >= 0 {
				end++
			}
			size, err := numericSize(string(raw[i:end]))
			if err != nil {
				return 0, err
			}
			n, i = n+size, end
		default: // { } [ ] and the letters of true, false, null: printed as given
			n, i = n+1, i+1
		}
	}
	return n, nil
}

// jsonStringSize measures the string starting at raw[i] (its opening quote) as stored and
// answered, and returns the index after its closing quote. raw is valid JSON.
func jsonStringSize(raw []byte, i int) (size, end int, err error) {
	size = 2
	for j := i + 1; ; {
		switch c := raw[j]; {
		case c == '"':
			return size, j + 1, nil
		case c == '\\' && raw[j+1] == 'u':
			r, _ := strconv.ParseUint(string(raw[j+2:j+6]), 16, 32)
			j += 6
			switch {
			case r == 0:
				return 0, 0, errors.New(`\u0000 in a string`)
			case r >= 0xdc00 && r <= 0xdfff:
				return 0, 0, errors.New("an unpaired UTF-16 surrogate escape in a string")
			case r >= 0xd800 && r <= 0xdbff:
				if j+6 > len(raw) || raw[j] != '\\' || raw[j+1] != 'u' {
					return 0, 0, errors.New("an unpaired UTF-16 surrogate escape in a string")
				}
				lo, _ := strconv.ParseUint(string(raw[j+2:j+6]), 16, 32)
				if lo < 0xdc00 || lo > 0xdfff {
					return 0, 0, errors.New("an unpaired UTF-16 surrogate escape in a string")
				}
				j += 6
				size += 4 // a rune outside the BMP: four bytes of UTF-8
			default:
				size += storedRuneSize(rune(r))
			}
		case c == '\\':
			size += 2 // \" \\ \b \f \n \r \t print as they came; \/ prints as /
			if raw[j+1] == '/' {
				size--
			}
			j += 2
		default:
			r, w := utf8.DecodeRune(raw[j:])
			size += storedRuneSize(r)
			j += w
		}
	}
}

// storedRuneSize is the larger of r's size as jsonb prints it in a string (escape_json:
// \" \\ \b \f \n \r \t, other controls as \u00XX, the rest as UTF-8) and as the API's
// encoder answers that (which also escapes <, >, &, U+2028 and U+2029 as \uXXXX).
func storedRuneSize(r rune) int {
	switch r {
	case '"', '\\', '\b', '\f', '\n', '\r', '\t':
		return 2
	case '<', '>', '&', '\u2028', '\u2029':
		return 6
	}
	if r < 0x20 {
		return 6
	}
	return utf8.RuneLen(r)
}

// numericSize returns the length of the JSON number s as PostgreSQL's numeric prints it:
// without exponent, leading zeros dropped, as many decimals as s implies (its fraction
// digits minus its exponent, so 1.50 stays 1.50, 1.5e1 is 15, 1e-3 is 0.001), no sign on
// zero. A number numeric cannot hold is an error.
func numericSize(s string) (int, error) {
	mant, exp, _ := strings.Cut(strings.ToLower(s), "e")
	neg := strings.HasPrefix(mant, "-")
	intPart, frac, _ := strings.Cut(strings.TrimPrefix(mant, "-"), ".")
	e, err := strconv.ParseInt(exp, 10, 64)
	if exp == "" {
		e, err = 0, nil
	}
	outOfRange := fmt.Errorf("number %s is outside PostgreSQL numeric's range (at most %d digits before the point and %d after)",
		quoteNumber(s), numericMaxIntDigits, numericMaxScale)
	if err != nil || e >= numericMaxExponent || e <= -numericMaxExponent {
		return 0, outOfRange // ParseInt fails only beyond int64, far outside that range too
	}
	scale := max(int64(len(frac))-e, 0)
	digits := intPart + frac
	significant := strings.TrimLeft(digits, "0")
	intDigits := int64(0)
	if significant != "" {
		// the point sits after len(intPart)+e digits; the dropped leading zeros come before it
		intDigits = max(int64(len(intPart))+e-int64(len(digits)-len(significant)), 0)
	}
	if intDigits > numericMaxIntDigits || scale > numericMaxScale {
		return 0, outOfRange
	}
	size := max(intDigits, 1)
	if scale > 0 {
		size += 1 + scale
	}
	if neg && significant != "" {
		size++
	}
	return int(size), nil
}

// quoteNumber shortens a number for an error message.
func quoteNumber(s string) string {
	if len(s) > numberErrorMaxQuoted {
		return s[:numberErrorMaxQuoted] + "…"
	}
	return s
}
