// Command budgetcheck asks the pipeline before an LLM request whether the tenant's budget allows
// it, the way a gateway should: a short timeout, one retry with the same gateway_request_id, and
// a chosen behaviour when the check cannot be reached (fail open or fail closed). Standard
// library only; money stays a decimal string end to end.
//
//	go run ./budgetcheck -tenant acme -charge 0.25 -user user-42
//
// Flags (each defaults to the environment variable named):
//
//	-url          LLM_USAGE_API_URL     http://localhost:8080
//	-token        LLM_USAGE_API_TOKEN   a JWT with role gateway
//	-id           a new id; reuse the request's own id, and publish its usage event with it
//	-timeout      per attempt (500ms)
//	-fail-open    allow when the check does not answer (default: fail closed, deny)
//
// It prints one line per answer and exits 0 for allow, 1 for deny, 2 for a refused request (a
// bad token or body: fix it, it is not an outage).
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

// Check is the request body. Money is a string: a float64 cannot hold most decimals exactly.
type Check struct {
	GatewayRequestID   string  `json:"gateway_request_id"`
	TenantID           string  `json:"tenant_id"`
	DeploymentID       *string `json:"deployment_id"`
	UserID             *string `json:"user_id"`
	AgentID            *string `json:"agent_id"`
	EstimatedChargeUSD string  `json:"estimated_charge_usd"`
}

// DeniedLimit is one blocking limit a denied check would have broken.
type DeniedLimit struct {
	ScopeType string `json:"scope_type"`
	ScopeID   string `json:"scope_id"`
	Window    string `json:"window"`
	LimitUSD  string `json:"limit_usd"`
	SpendUSD  string `json:"spend_usd"`
	HeldUSD   string `json:"held_usd"`
}

// Answer is the check's answer; a repeated id answers the first answer.
type Answer struct {
	Decision           string        `json:"decision"`
	DeniedBy           []DeniedLimit `json:"denied_by"`
	HoldExpiresAt      *string       `json:"hold_expires_at"`
	EstimatedChargeUSD string        `json:"estimated_charge_usd"`
}

// errUnavailable marks what the fallback decides: a timeout, a refused connection, a 5xx.
var errUnavailable = errors.New("budget check unavailable")

// refusedError is a 4xx: a bad token or body, never decided by the fallback.
type refusedError struct {
	status int
	body   string
}

func (e *refusedError) Error() string { return fmt.Sprintf("HTTP %d: %s", e.status, e.body) }

func checkOnce(client *http.Client, url, token string, body []byte) (*Answer, error) {
	request, err := http.NewRequest(http.MethodPost, strings.TrimRight(url, "/")+"/v1/budget-checks", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	request.Header.Set("Authorization", "Bearer "+token)
	request.Header.Set("Content-Type", "application/json")
	response, err := client.Do(request)
	if err != nil {
		return nil, fmt.Errorf("%w (%v)", errUnavailable, err)
	}
	defer response.Body.Close()
	text, err := io.ReadAll(response.Body)
	if err != nil {
		return nil, fmt.Errorf("%w (%v)", errUnavailable, err)
	}
	switch {
	case response.StatusCode >= 500: // 503: try again with the same id
		return nil, fmt.Errorf("%w (HTTP %d: %s)", errUnavailable, response.StatusCode, text)
	case response.StatusCode != http.StatusOK:
		return nil, &refusedError{response.StatusCode, string(text)}
	}
	var answer Answer
	if err := json.Unmarshal(text, &answer); err != nil {
		return nil, fmt.Errorf("%w (unreadable answer: %v)", errUnavailable, err)
	}
	return &answer, nil
}

// check retries once with the same id: a repeat never holds twice.
func check(client *http.Client, url, token string, body []byte) (*Answer, error) {
	answer, err := checkOnce(client, url, token, body)
	if errors.Is(err, errUnavailable) {
		answer, err = checkOnce(client, url, token, body)
	}
	return answer, err
}

func describe(id string, answer *Answer) string {
	if answer.Decision == "allow" {
		if answer.HoldExpiresAt == nil {
			return fmt.Sprintf("allow %s: already counted, nothing held", id)
		}
		return fmt.Sprintf("allow %s: held %s USD until %s", id, answer.EstimatedChargeUSD, *answer.HoldExpiresAt)
	}
	limits := make([]string, 0, len(answer.DeniedBy))
	for _, l := range answer.DeniedBy {
		limits = append(limits, fmt.Sprintf("%s %s %s limit %s USD (spend %s, held %s)",
			l.ScopeType, l.ScopeID, l.Window, l.LimitUSD, l.SpendUSD, l.HeldUSD))
	}
	return fmt.Sprintf("deny %s: %s USD over %s", id, answer.EstimatedChargeUSD, strings.Join(limits, "; "))
}

func main() {
	url := flag.String("url", env("LLM_USAGE_API_URL", "http://localhost:8080"), "the API's base URL")
	token := flag.String("token", os.Getenv("LLM_USAGE_API_TOKEN"), "a JWT with role gateway")
	tenant := flag.String("tenant", "", "tenant_id (required)")
	charge := flag.String("charge", "", "the estimate in USD, an exact decimal such as 0.25 (required)")
	id := flag.String("id", "req-"+randomHex(16), "gateway_request_id: the request's own id")
	deployment := flag.String("deployment", "", "deployment_id, if any")
	user := flag.String("user", "", "user_id, if any")
	agent := flag.String("agent", "", "agent_id, if any")
	timeout := flag.Duration("timeout", 500*time.Millisecond, "time allowed per attempt")
	failOpen := flag.Bool("fail-open", false, "allow when the check does not answer")
	flag.Bool("fail-closed", true, "deny when the check does not answer (the default)")
	flag.Parse()
	if *tenant == "" || *charge == "" {
		fmt.Fprintln(os.Stderr, "error: -tenant and -charge are required")
		os.Exit(2)
	}

	body, err := json.Marshal(Check{
		GatewayRequestID:   *id,
		TenantID:           *tenant,
		DeploymentID:       optional(*deployment),
		UserID:             optional(*user),
		AgentID:            optional(*agent),
		EstimatedChargeUSD: *charge,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
	answer, err := check(&http.Client{Timeout: *timeout}, *url, *token, body)
	var refused *refusedError
	switch {
	case errors.As(err, &refused):
		fmt.Printf("refused %s: %v\n", *id, refused)
		os.Exit(2)
	case err != nil && *failOpen:
		// Runs unheld: still counted and alerted, but outside the limit's guarantee.
		fmt.Printf("allow %s: %v; failing open\n", *id, err)
		return
	case err != nil:
		// Refuses paying traffic while the check is down.
		fmt.Printf("deny %s: %v; failing closed\n", *id, err)
		os.Exit(1)
	}
	fmt.Println(describe(*id, answer))
	if answer.Decision != "allow" {
		os.Exit(1)
	}
}

func optional(value string) *string {
	if value == "" {
		return nil
	}
	return &value
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
	return hex.EncodeToString(b)
}

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}
