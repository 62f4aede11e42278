<?php
// The streaming endpoint: authenticate, decide what to stream, hand off.
// streamd writes the whole response; anything PHP prints is discarded.

session_start();
if (empty($_SESSION['user_id'])) {
    http_response_code(401);
    header('Content-Type: application/json');
    echo json_encode(['error' => ['type' => 'unauthorized', 'message' => 'log in first']]);
    exit;
}
session_write_close();  // do not hold the session lock for the stream

$body = json_decode(file_get_contents('php://input'), true);
$prompt = is_array($body) && is_string($body['prompt'] ?? null) ? $body['prompt'] : '';
if ($prompt === '' || mb_strlen($prompt) > 8000) {
    http_response_code(400);
    header('Content-Type: application/json');
    echo json_encode(['error' => ['type' => 'invalid_request', 'message' => 'prompt: 1 to 8000 characters']]);
    exit;
}

$data = [
    'prompt'        => $prompt,
    'user_id'       => (int)$_SESSION['user_id'],
    'request_id'    => bin2hex(random_bytes(8)),
    'model'         => 'gpt-4o-mini',
    'max_tokens'    => 1024,
    'include_usage' => true,
    // Extra headers streamd adds to its 200 response (validated there).
    'response_headers' => ['X-Request-Id' => $_SERVER['UNIQUE_ID'] ?? ''],
];

header('X-Socket-Handoff: /run/streamd/streamd.sock');
// json_encode escapes newlines, so this header is always one line.
header('X-Handoff-Data: ' . json_encode($data, JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR));
